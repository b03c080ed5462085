"""`python -m infer` and `accelerate launch -m infer`: the `avlabel caption` command."""

from avlabel.cli import run_command

run_command("caption", prog=f"python -m {__package__}")
