"""`avlabel`: one command line for the whole loop.

Each subcommand is a module with `make_parser(subparsers=None)` and `main(...)`, in the
style of TRL's scripts, so `python -m <package>`, `accelerate launch -m <package>` and
`avlabel <command>` run the same code and read the same YAML configs (`--config`).
"""

from __future__ import annotations

import importlib
import sys

# command -> module; the module defines make_parser(subparsers=None) and main(*parsed)
COMMANDS = {
    "synth": "avlabel.demo.synthetic",
    "build": "avlabel.data_builder.build",
    "tiny-model": "avlabel.demo.tiny_model",
    "caption": "avlabel.infer.caption",
    "train": "avlabel.train.sft",
    "export": "avlabel.train.export",
    "metrics": "avlabel.eval.metrics",
    "judge": "avlabel.eval.judge",
    "compare": "avlabel.eval.compare",
    "publish": "avlabel.hub.publish",
    "search": "avlabel.catalog.cli",
    "demo": "avlabel.demo.run",
}


def _parse(module, prog: str, argv):
    parser = module.make_parser()
    parser.prog = prog
    return parser.parse_args_and_config(args=argv)


def main(argv: list[str] | None = None, commands: dict[str, str] | None = None, prog: str = "avlabel") -> None:
    """Run a subcommand; a package's `__main__` passes its own subset of `commands` and its `prog`."""
    from trl import TrlParser

    argv = sys.argv[1:] if argv is None else argv
    top = TrlParser(dataclass_types=[], prog=prog, description=__doc__.splitlines()[0])
    subparsers = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=TrlParser)
    modules = {}
    for name, path in (COMMANDS if commands is None else commands).items():
        modules[name] = importlib.import_module(path)
        modules[name].make_parser(subparsers)
    if not argv or argv[0] not in modules:
        top.parse_args(argv or ["--help"])
        return
    module = modules[argv[0]]
    module.main(*_parse(module, f"{prog} {argv[0]}", argv[1:]))


if __name__ == "__main__":
    main()
