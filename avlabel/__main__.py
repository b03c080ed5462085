"""`python -m avlabel`: the same as the `avlabel` command."""

from avlabel.cli import main

main()
