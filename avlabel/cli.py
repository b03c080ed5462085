"""`avlabel`: one command line for the whole loop.

Each subcommand is a module with `make_parser(subparsers=None)` and `main(...)`, in the
style of TRL's scripts, so `python -m <package>`, `accelerate launch -m <package>` and
`avlabel <command>` run the same code and read the same YAML configs (`--config`).
Only the chosen command's module is imported, and its command line is checked before
anything heavy loads; every error ends as one line (avlabel/core/errors.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from avlabel.core.errors import DEBUG_ENV, did_you_mean, run

# command -> (module, one-line help); the module defines make_parser(subparsers=None) and main(*parsed)
COMMANDS = {
    "synth": ("avlabel.demo.synthetic", "Write procedural dashcam-like clips with matching labels"),
    "build": ("avlabel.data_builder.build", "Build a Hugging Face dataset folder from clips and labels"),
    "tiny-model": ("avlabel.demo.tiny_model", "Write a small randomly initialised Qwen-VL test model"),
    "caption": ("avlabel.infer.caption", "Label clips with a Cosmos Reason model"),
    "train": ("avlabel.train.sft", "Fine-tune Cosmos Reason on a built dataset (LoRA, QLoRA or full)"),
    "export": ("avlabel.train.export", "Merge a training checkpoint into a bf16 model"),
    "metrics": ("avlabel.eval.metrics", "Deterministic per-field metrics of one run"),
    "judge": ("avlabel.eval.judge", "Score one run's answers with an LLM judge"),
    "calibrate": ("avlabel.eval.calibration", "Fit a model's confidence calibration on held-out labeled clips"),
    "compare": ("avlabel.eval.compare", "Compare runs with intervals and paired tests; write the report"),
    "review": ("avlabel.eval.review", "Choose the clips a person should check; round-trip them through Label Studio"),
    "publish": ("avlabel.hub.publish", "Push a model, a dataset, an evaluation run and the metric to the Hub"),
    "search": ("avlabel.catalog.cli", "Index captions and labels; search, look at and export clips"),
    "demo": ("avlabel.demo.run", "Run the whole loop on synthetic clips and a tiny model (CPU, offline)"),
}


def _without_bitsandbytes(values: dict) -> None:
    """Make bitsandbytes look absent to this process when its command line loads no 4- or 8-bit
    weights (train's load_in_4bit/load_in_8bit, caption's --quantization).

    peft imports it whenever peft is imported (peft/helpers.py), and transformers' Trainer imports
    peft; bitsandbytes then loads its CPU kernels (seconds) and logs "Failed to load CPU
    gemm_4bit_forward from kernels-community" on every command. A None entry in sys.modules makes
    `import bitsandbytes` fail and `find_spec` report it missing, which every library handles.
    """
    if not any(values.get(name) for name in ("load_in_4bit", "load_in_8bit", "quantization")):
        sys.modules.setdefault("bitsandbytes", None)


def _started_as(name: str) -> str:
    """How the command `name` was started, for its messages: `python -m <module>` when Python runs the command's
    module as the script (`python -m avlabel.eval.metrics`, `python -m eval.metrics` in a clone), else `avlabel <name>`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and COMMANDS[name][0] in (spec.name, f"avlabel.{spec.name}"):
        return f"python -m {spec.name}"
    return f"avlabel {name}"


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None):
    """Parse `argv` for the command `name` and run it; every error ends as one line on stderr. A package's
    `__main__` gives its `prog` (`python -m {__package__}`)."""
    module_name = COMMANDS[name][0]
    prog = prog or _started_as(name)
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse_and_run():
        from avlabel.core.parser import ArgumentParser

        if {"-h", "--help"} & set(argv):  # help, printed before any check, imports train's Trainer but loads no weights
            _without_bitsandbytes({})
        module = importlib.import_module(module_name)
        parser = module.make_parser(argparse.ArgumentParser().add_subparsers(parser_class=ArgumentParser))
        parser.prog = prog
        parser.checks.append(_without_bitsandbytes)  # before train's parse imports the Trainer, and peft
        return module.main(*parser.parse_args_and_config(argv))

    return run(parse_and_run, prog=prog)


def main(argv: list[str] | None = None, commands: dict[str, tuple[str, str]] | None = None, prog: str = "avlabel"):
    """Run a subcommand; a package's `__main__` passes its own subset of `commands` and its `prog`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = COMMANDS if commands is None else commands
    top = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    top.add_argument("--debug", action="store_true", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1).")
    top.add_argument("--version", action="store_true", help="Print avlabel's version and exit.")
    subparsers = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_line) in commands.items():
        subparsers.add_parser(name, help=help_line)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"  # processes the command starts (accelerate, workers) inherit it
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        raise SystemExit(0)
    if argv[0] == "--version":  # what a bug report names
        from avlabel import __version__

        print(f"avlabel {__version__}")
        raise SystemExit(0)
    if argv[0] not in commands:
        print(f"{prog}: error: unknown command {argv[0]!r}{did_you_mean(argv[0], commands)} (see {prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)
    return run_command(argv[0], argv[1:], f"{prog} {argv[0]}")



def console() -> None:
    """The `avlabel` console script. `main` returns the command's result to Python callers; the
    script wrapper would pass it to sys.exit, printing it and exiting 1, so it is dropped here."""
    main()


if __name__ == "__main__":
    main()
