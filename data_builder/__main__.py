"""`python -m data_builder build|synth ...`: the data commands of `avlabel`, without installing the command."""

from avlabel.cli import COMMANDS, main

if __name__ == "__main__":
    main(commands={name: COMMANDS[name] for name in ("build", "synth")}, prog=f"python -m {__package__}")
