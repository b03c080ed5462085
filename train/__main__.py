"""`python -m train` and `accelerate launch -m train`: the training script (see train/sft.py)."""

from avlabel.cli import run_command

run_command("train", prog=f"python -m {__package__}")
