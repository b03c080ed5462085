"""`python -m hub publish ...` (and `demo`): the Hub commands of `avlabel`, without installing the command."""

from avlabel.cli import COMMANDS, main

if __name__ == "__main__":
    main(commands={name: COMMANDS[name] for name in ("publish", "demo")}, prog="python -m hub")
