"""`python -m eval metrics|judge|compare|calibrate|review ...`: the evaluation commands of `avlabel`, without installing the command."""

from avlabel.cli import COMMANDS, main

if __name__ == "__main__":
    main(commands={name: COMMANDS[name] for name in ("metrics", "judge", "compare", "calibrate", "review")},
         prog=f"python -m {__package__}")
