"""`python -m infer` and `accelerate launch -m infer`: the `avlabel caption` command."""

from avlabel.infer.caption import main, make_parser

parser = make_parser()
parser.prog = "python -m infer"
main(*parser.parse_args_and_config())
