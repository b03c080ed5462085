"""`python -m hub publish ...`: the Hub command of `avlabel`, without installing the command."""

from avlabel.cli import COMMANDS, main

if __name__ == "__main__":
    main(commands={name: COMMANDS[name] for name in ("publish",)}, prog="python -m hub")
