"""`python -m train` and `accelerate launch -m train`: the training script (see train/sft.py)."""

from train.sft import main, make_parser

main(*make_parser().parse_args_and_config())
