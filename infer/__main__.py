"""`python -m infer` and `accelerate launch -m infer`: the `avlabel caption` command."""

from .caption import main, make_parser

main(*make_parser().parse_args_and_config())
