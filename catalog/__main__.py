"""`python -m catalog`: the `avlabel search` command (see catalog/cli.py)."""

from avlabel.cli import run_command

run_command("search", prog=f"python -m {__package__}")
