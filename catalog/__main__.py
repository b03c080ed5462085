"""`python -m catalog`: the `avlabel search` command (see catalog/cli.py)."""

from avlabel.catalog.cli import main, make_parser

main(*make_parser().parse_args_and_config())
