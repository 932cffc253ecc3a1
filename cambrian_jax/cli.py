"""What every command line shares: its exit codes and one line for every ordinary mistake.

Exit codes of every `python -m cambrian_jax.…` command:

  0   done
  1   an unexpected error (a bug: the traceback is printed)
  2   bad input: a config, file, image, data record or checkpoint that cannot be used; one line on
      stderr names it and says what to do; nothing was written
  3   `plan`: the configuration does not fit the topology
  4   `train`: stopped on a non-finite loss; the last good checkpoint stays
  75  `train`: preempted (SIGTERM); a checkpoint was saved and the same command resumes
      (EX_TEMPFAIL: a scheduler that sees it restarts the job instead of marking it finished)
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, NoReturn

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
EXIT_NON_FINITE = 4
EXIT_PREEMPTED = 75


class InputError(ValueError):
    """A mistake in what the user gave (a path, a name, a file's contents): reported in one line, exit 2."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from cambrian_jax.config import ConfigError  # noqa: PLC0415
    from cambrian_jax.convert.assign import CheckpointMismatch  # noqa: PLC0415
    from cambrian_jax.convert.safetensors_io import CheckpointError  # noqa: PLC0415

    return (InputError, ConfigError, CheckpointError, CheckpointMismatch)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def guarded(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run an entry point so that a known error (InputError, ConfigError, CheckpointError,
    CheckpointMismatch) ends it with one line and exit 2 instead of a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except _known_errors() as e:
            fail(str(e))

    return run


def existing_dir(path: str | os.PathLike, what: str) -> str:
    """`path` if it is a directory (or a remote gs:// path), else an InputError naming it."""
    path = os.fspath(path)
    if "://" in path or os.path.isdir(path):
        return path
    state = "is a file, not a directory" if os.path.exists(path) else "does not exist"
    raise InputError(f"{what} {path} {state}")


def existing_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if "://" in path or os.path.isfile(path):
        return path
    state = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
    raise InputError(f"{what} {path} {state}")


def open_image(path: str | os.PathLike, what: str = "image"):
    """A PIL image, fully decoded, or an InputError naming the path (missing, or not an image)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    path = existing_file(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {path} is not a readable image ({type(e).__name__}: {e}); give a PNG/JPEG file") \
            from None
