"""One line per mistake: the errors a user can cause, and how every command reports them.

`UsageError` means the command line is wrong (exit 2: change an argument); any other error,
such as an input that can't be read (`avlabel.core.problems.InputError`), exits 1. `run` prints
each as one line on stderr, `<prog>: error: <what is wrong and what to do>`; the traceback
appears only with `avlabel --debug ...` or AVLABEL_DEBUG=1. UsageError is a ValueError, so code
that catches ValueError keeps working.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable

from avlabel.extras import DependencyError

DEBUG_ENV = "AVLABEL_DEBUG"


class UsageError(ValueError):
    """The command line is wrong: a flag, a value, a path that isn't there."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' for the closest of `choices`, or '' when none is close."""
    choices = list(choices)
    # a flag cut short (--out for --output_dir) is nearer its whole than any look-alike difflib would rank first
    close = [choice for choice in choices if len(word) > 2 and choice.startswith(word)][:1] or \
        difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(function: Callable[..., Any], *args: Any, prog: str) -> Any:
    """`function(*args)`, with any error it raises printed as one line and turned into an exit code.

    SIGTERM (a cluster's scheduler preempting the job, `kill`, a container stopping) stops the command as Ctrl-C
    does: what is done is saved on the way out and the rerun resumes from it, where the default would end the
    process on the spot."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return function(*args)
    except KeyboardInterrupt:
        if debugging():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every error ends as one line unless debugging
        if debugging():
            raise
        message = one_line(err) or type(err).__name__
        # errors the user can cause are ValueErrors (ours), OSErrors (a file) or a missing extra (its
        # message names the pip command); anything else is ours to fix
        if not isinstance(err, (ValueError, OSError, DependencyError)):
            cause = err
            while cause.__cause__ is not None:  # a library's wrapper ("An error occurred while ...") hides the reason
                cause = cause.__cause__
            if cause is not err:
                message += f" (because {type(cause).__name__}: {one_line(cause)[:300]})"
            message = f"{type(err).__name__}: {message} (rerun with {DEBUG_ENV}=1 for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(getattr(err, "exit_code", 1)) from None
