"""The argument parser of every command: TRL's (dataclasses, a YAML `--config`), answering each mistake in one line.

On top of `TrlParser`:
* abbreviations are refused (`--max_step 2` is not `--max_steps 2`);
* an unknown flag or `--config` key is named, with the closest known one;
* a missing or unreadable `--config` file, a bad value, and a dataclass refusing a value in its
  `__post_init__` each end as one line (a `UsageError`, exit 2);
* an `--output_dir` the command could not write (a path under a file, a folder this user can't
  write into) is refused once, by name, before any work (`check_output_dir`; an output file:
  `check_output_file`);
* a dataclass too heavy to import just to read a command line (TRL's `SFTConfig` imports torch and
  the Trainer: seconds) can be `Deferred`: its options come from a snapshot of them, so a mistake is
  reported at once, and the class is imported only when the command line has passed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trl import TrlParser

from .errors import UsageError, did_you_mean, one_line

CONFIG_FLAG = "--config"


@dataclass(frozen=True)
class Deferred:
    """A dataclass of arguments named by "module:Class", read from `snapshot` until it is needed.

    The snapshot holds the argparse shape of each of its options, written by `write_snapshot`
    for the installed versions of `packages`; with other versions the class is imported at once.
    """

    path: str
    snapshot: Path
    packages: tuple[str, ...]

    def load(self) -> type:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)

    def _versions(self) -> dict[str, str]:
        return {package: importlib.metadata.version(package) for package in self.packages}

    def options(self) -> list[dict[str, Any]] | None:
        """The snapshot's options, or None if it was written for other versions (or not at all)."""
        try:
            saved = json.loads(self.snapshot.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved["options"] if saved.get("versions") == self._versions() else None

    def current(self) -> dict[str, Any]:
        """The snapshot as `write_snapshot` writes it, from the class itself."""
        parser = TrlParser(dataclass_types=[self.load()])
        options = [  # nargs 0: a `--no_<flag>` of a boolean that defaults to true
            {"flags": action.option_strings, "dest": action.dest, "nargs": action.nargs, "const": action.const}
            for action in parser._actions if action.option_strings and action.dest != "help"
        ]
        return {"class": self.path, "versions": self._versions(), "options": options}

    def write_snapshot(self) -> Path:
        """Write the snapshot, one option a line (regenerate it after upgrading `packages`)."""
        snapshot = self.current()
        options = ",\n".join(f"  {json.dumps(option)}" for option in snapshot.pop("options"))
        self.snapshot.write_text(json.dumps(snapshot)[:-1] + f', "options": [\n{options}\n]}}\n', encoding="utf-8")
        return self.snapshot


class ArgumentParser(TrlParser):
    """`TrlParser` that refuses abbreviations and reports every mistake in one line (see the module docstring).

    `checks` (`check`, `check_output_dir` of any `output_dir`, and any added later) see every parsed
    value by name ({dest: value}) before any deferred class is imported, so checks across dataclasses
    (does the checkpoint to resume exist?) cost no import.
    """

    def __init__(self, dataclass_types=None, check: Callable[[dict[str, Any]], None] | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        types = list(dataclass_types or [])
        # a deferred class without a snapshot for the installed versions is imported now to read its options, but
        # still built after the checks (its __post_init__ would otherwise answer first, e.g. bf16 on a CPU)
        self._types = types
        self._deferred = {item: item.options() or item.current()["options"] for item in types if isinstance(item, Deferred)}
        self.checks = ([check] if check else []) + [_check_output_dirs]
        self._kwargs = kwargs
        super().__init__([item for item in self._types if not isinstance(item, Deferred)], **kwargs)
        for options in self._deferred.values():
            for option in options:  # values stay strings here: the class's own parse types them later
                if option["nargs"] == 0:  # --no_<flag>
                    kind = {"action": "store_const", "const": False}
                else:
                    kind = {"nargs": option["nargs"], "const": option["const"]}
                self.add_argument(*option["flags"], dest=option["dest"], default=argparse.SUPPRESS, **kind)

    def error(self, message: str):
        """argparse prints its usage and the message; here the message alone, as one line."""
        raise UsageError(f"{one_line(message)} (see {self.prog} --help)")

    def _full(self) -> ArgumentParser:
        """This parser with the deferred classes imported."""
        types = [item.load() if isinstance(item, Deferred) else item for item in self._types]
        full = type(self)(types, **{**self._kwargs, "prog": self.prog})
        full.checks = []  # only parsed after this parser's checks passed
        return full

    def parse_dict(self, args: dict[str, Any], allow_extra_keys: bool = False):
        if self._deferred:
            return self._full().parse_dict(args, allow_extra_keys=allow_extra_keys)
        return super().parse_dict(args, allow_extra_keys=allow_extra_keys)

    def format_help(self) -> str:
        if self._deferred:
            return self._full().format_help()
        # TrlParser reads --config itself, so argparse never lists it
        config = (f"{CONFIG_FLAG} FILE: a YAML file of any of the arguments above (recipes/ has examples); a flag "
                  "given on the command line wins over it.")
        return super().format_help().rstrip("\n") + "\n\n" + textwrap.fill(config, width=79) + "\n"

    def parse_args_and_config(self, args=None, return_remaining_strings: bool = False, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith(f"{CONFIG_FLAG}=") else [arg])]
        if any(arg in ("-h", "--help") for arg in args):
            self.print_help()
            self.exit()
        known = self._option_names()
        for flag in (arg.split("=", 1)[0] for arg in args if arg.startswith("--")):
            if flag not in known:  # before argparse, which would first complain of a required flag
                raise UsageError(f"unrecognized argument {flag}" + (did_you_mean(flag, known) or f" (see {self.prog} --help)"))
        if CONFIG_FLAG in args:
            index = args.index(CONFIG_FLAG)
            if index + 1 == len(args):
                raise UsageError(f"{CONFIG_FLAG} needs a YAML file")
            args[index + 1] = packaged_recipe(args[index + 1])
            self._check_config(args[index + 1])
        try:
            *parsed, remaining = super().parse_args_and_config(args, return_remaining_strings=True, **kwargs)
        except UsageError:
            raise
        except ValueError as err:  # a dataclass refused a value (its __post_init__), or TRL refused the config
            raise UsageError(one_line(err)) from None
        if remaining and not return_remaining_strings:
            self._refuse(remaining)
        values: dict[str, Any] = {}
        for item in parsed:
            values.update(vars(item))
        for check in self.checks:
            check(values)
        if self._deferred:
            # the command line passed every check; now parse it into the real classes (no check again: see _full)
            return self._full().parse_args_and_config(args, return_remaining_strings=return_remaining_strings, **kwargs)
        return (*parsed, remaining) if return_remaining_strings else tuple(parsed)

    def _option_names(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")] + [CONFIG_FLAG]

    def _refuse(self, remaining: list[str]):
        self.error(f"unexpected argument {remaining[0]!r}: values follow their flag (--name value)")

    def _check_config(self, path: str) -> None:
        import yaml

        where = f"{CONFIG_FLAG} {path}"
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{where}: no such file; give the path of a YAML recipe (the installed ones are in "
                             f"{recipes_folder()})") from None
        except IsADirectoryError:
            raise UsageError(f"{where}: a folder, not a YAML file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"{where}: can't be read ({err})") from None
        except yaml.YAMLError as err:
            raise UsageError(f"{where}: not valid YAML ({one_line(err)})") from None
        if not isinstance(config, dict):
            raise UsageError(f"{where}: must be a YAML mapping of argument: value")
        if not isinstance(config.get("env", {}), dict):
            raise UsageError(f"{where}: `env` must be a mapping of variable: value")
        known = {action.dest for action in self._actions} | {"env"}
        for key in config:
            if key not in known:
                raise UsageError(f"{where}: unknown argument {key!r}{did_you_mean(str(key), known)}")


def recipes_folder() -> Path:
    """recipes/ of a clone, or avlabel/recipes/ in site-packages for a pip install."""
    from avlabel import recipes

    return Path(recipes.__file__).parent


def packaged_recipe(path: str) -> str:
    """`recipes/...` as the README writes it: the file there, else the one the package ships, so a pip install
    (which has no recipes/ folder beside the user) runs the README's commands as a clone does."""
    parts = Path(path).parts
    if Path(path).exists() or len(parts) < 2 or parts[0] != "recipes":
        return path
    shipped = recipes_folder().joinpath(*parts[1:])
    return str(shipped) if shipped.is_file() else path


def check_input(value: str) -> str:
    """The layout of an `--input` (`layouts.detect_layout`); an input that is not there is a command-line
    mistake."""
    from .layouts import detect_layout
    from .problems import InputError

    try:
        return detect_layout(value)
    except InputError as err:
        raise UsageError(f"--input {err}") from None


def check_output_dir(value: str, flag: str) -> None:
    """Refuse an output folder the command could not write: an existing file, a path under a file, or a
    folder (when it is not there yet, the nearest one above it) this user can't create files in (its
    permissions, or a read-only file system). Said before any work, naming the flag, rather than as
    OSError's "Permission denied: 'x'" at the first write."""
    path = Path(value)  # as the commands write it: a `~` from a YAML recipe is no shell's to expand
    _check_writable_folder(next(_nearest_there(path)), path, value, flag, "give the path of a folder to write to")


def check_output_file(value: str, flag: str) -> None:
    """Refuse an output file the command could not write, as `check_output_dir` does a folder: a folder in
    its place, a path under a file, a folder above it this user can't create files in, or a file there
    they can't overwrite. Said before the work whose result it would hold."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"{flag} {value}: it is a folder; give the path of a file to write")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {value}: the file can't be written (no permission, or a read-only file system); "
                             "choose another path")
        return
    _check_writable_folder(next(_nearest_there(path.parent)), path, value, flag, "give a path in a folder")


def _nearest_there(path: Path):
    """The parts of `path` that are there, nearest first ("." or "/" at the latest); os.path.exists is
    False on any OSError, so a path under a file is not there."""
    yield from (folder for folder in (path, *path.parents) if os.path.exists(folder))
    yield path


def _check_writable_folder(there: Path, path: Path, value: str, flag: str, remedy: str) -> None:
    if not there.is_dir():
        where = "it is" if there == path else f"{there} is"
        raise UsageError(f"{flag} {value}: {where} a file, not a folder; {remedy}")
    if not os.access(there, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: {there} can't be written (no permission, or a read-only file system); "
                         "choose a folder you can write to")


def _check_output_dirs(values: dict[str, Any]) -> None:
    """Every command's `--output_dir` (unset: a default the command derives) is a folder it writes."""
    if values.get("output_dir"):
        check_output_dir(str(values["output_dir"]), "--output_dir")


def check_path(value: str, shown: str) -> None:
    """Refuse a local path that is not there (a command-line mistake); `shown` is the flag and value as given."""
    if not Path(value).expanduser().exists():
        raise UsageError(f"{shown}: no such file or folder; check the path")


def check_at_least(minimum: float, **values: float | None) -> None:
    """Refuse an option (given as option_name=value) under `minimum`; None is an unset option and passes."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name} {value}: give a number of at least {minimum:g}")


def check_source(value: str, option: str, what: str) -> None:
    """Refuse a `value` that is neither an existing local path nor a Hub id (owner/name) of `what`.

    Said before any download is tried, so a mistyped folder is reported as one, not as the Hub's
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    """
    from .layouts import is_hub_id

    if not Path(value).expanduser().exists() and not is_hub_id(value, namespaced=False):
        raise UsageError(f"{option} {value}: no such file or folder, and not a Hub {what} id (owner/name); check the path")


def check_split(source: str, split: str | None, option: str) -> str | None:
    """The split of the dataset `source` (given with `option`) to read: `split`, which a folder `avlabel build`
    wrote must have; None: that folder's only split (a dataset of several must be told which). A Hub dataset's
    splits are known only once it loads, so None there must be a split; anything that is no dataset has none."""
    from .layouts import METADATA_NAME, is_hub_id

    built = sorted(path.parent.name for path in Path(source).glob(f"*/{METADATA_NAME}"))
    if split is not None:
        if built and split not in built:
            raise UsageError(f"--split {split}: {option} {source} has the split(s) {', '.join(built)}")
        return split
    if len(built) == 1:
        return built[0]
    if built or is_hub_id(source):
        has = f"has the splits {', '.join(built)}" if built else "is a Hub dataset"
        raise UsageError(f"--split: {option} {source} {has}; name the one to read with --split")
    return None


def check_model(value: str, option: str, adapter_option: str | None = None) -> None:
    """check_source for a model, and a local folder must be a model's (its config.json): an adapter or a
    training run given in its place is named, with the folder to give instead."""
    check_source(value, option, "model")
    folder = Path(value).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        instead = f" as {option} and this folder as {adapter_option}" if adapter_option else ""
        raise UsageError(f"{option} {value}: a LoRA adapter, not a model; give its base model{instead}, or the "
                         "run's merged/ folder as the model")
    if (folder / "merged" / "config.json").is_file():
        raise UsageError(f"{option} {value}: a training run; give its merged model, {folder / 'merged'}")
    raise UsageError(f"{option} {value}: no config.json, so not a model folder; give a model folder or a Hub id")

