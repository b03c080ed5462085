"""`python -m hub publish ...`: the Hub command of `avlabel`, without installing the command."""

from avlabel.cli import COMMANDS, main

if __name__ == "__main__":
    main(commands={name: COMMANDS[name] for name in ("publish",)}, prog=f"python -m {__package__}")
