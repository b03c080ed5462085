"""`python -m train` and `accelerate launch -m train`: the training script (see train/sft.py)."""

from avlabel.train.sft import main, make_parser

parser = make_parser()
parser.prog = "python -m train"
main(*parser.parse_args_and_config())
