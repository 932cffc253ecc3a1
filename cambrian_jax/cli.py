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

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as every other mistake: one line, exit 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def _existing(path: str | os.PathLike, what: str, directory: bool) -> str:
    path = os.fspath(path)
    if "://" in path or (os.path.isdir(path) if directory else os.path.isfile(path)):
        return path
    if not os.path.exists(path):
        raise InputError(f"{what} {path} does not exist")
    raise InputError(f"{what} {path} is a {'file, not a directory' if directory else 'directory, not a file'}")


def existing_dir(path: str | os.PathLike, what: str) -> str:
    """`path` if it is a directory (or a remote gs:// path), else an InputError naming it."""
    return _existing(path, what, directory=True)


def existing_file(path: str | os.PathLike, what: str) -> str:
    """`path` if it is a file (or a remote gs:// path), else an InputError naming it."""
    return _existing(path, what, directory=False)


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


# ------------------------------------------------------------------------------ absl + config_flags

def config_arg(argv) -> str | None:
    """The value of --config (path[:switches]) in argv, if any."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def config_importable(spec: str | None) -> None:
    """Config files import their siblings as `configs.common`: put the folder above configs/ on
    sys.path, so a config file works from any working directory."""
    if not spec:
        return
    path = os.path.abspath(spec.partition(":")[0])
    root = os.path.dirname(os.path.dirname(path))
    if root not in sys.path:
        sys.path.insert(0, root)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).replace("\\n", "\n").splitlines() if line.strip()]
    line = lines[-1] if lines else str(text)
    for prefix in ("ValueError: ", "KeyError: ", "TypeError: ", "AttributeError: ", "ConfigError: ",
                   "cambrian_jax.config.ConfigError: "):
        line = line.removeprefix(prefix)
    return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line


def _flag_error(e: BaseException, argv) -> str:
    """One line for a flag or --config mistake (config_flags wraps them in tracebacks)."""
    import re  # noqa: PLC0415

    text = str(e)
    m = re.search(r'Did you mean \\?"(\w+)\\?" instead of \\?"(\w+)\\?"', text)
    if m:                                    # --config.a.b=v on a field that does not exist
        right, wrong = m.group(1), m.group(2)
        arg = next((a for a in argv if a.startswith("--config.") and f".{wrong}" in a.split("=")[0]), wrong)
        return f"{arg.split('=')[0]}: the config has no field {wrong!r} (did you mean {right!r}?)"
    m = re.match(r"flag (--\S+): (.*)", text, re.S)
    if m and "Traceback" in text:            # the config file's get_config raised
        return f"{m.group(1).split('=', 1)[-1]}: {_last_line(text)}"
    if "not supported for overriding" in text:
        field = re.search(r"field (\S+) is", text)
        name = field.group(1) if field else "this field"
        return (f"{name} is a list, which --config.… overrides cannot set; use the config's switch for it "
                f"(see the config file's docstring), e.g. --config configs/x.py:data1=/path")
    return _last_line(text)


def parse_absl_flags(argv):
    """A flags_parser for absl.app.run: a flag, config-file, switch or override mistake is one line
    and exit 2, and the config is loaded (and checked) here, before the program starts."""
    from absl import flags  # noqa: PLC0415

    FLAGS = flags.FLAGS
    spec = config_arg(argv)
    config_importable(spec)
    if spec and not os.path.isfile(spec.partition(":")[0]):
        fail(f"--config {spec}: {spec.partition(':')[0]} does not exist; give a configs/*.py file "
             "(e.g. configs/cambrian_tiny.py)")
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error(e, argv))
    except Exception as e:  # noqa: BLE001 — config_flags raises the config's own errors while parsing
        fail(_flag_error(e, argv))
    if "config" in FLAGS and spec:
        try:
            FLAGS.config.get("model")      # config_flags loads lazily: an error surfaces at first use
        except Exception as e:  # noqa: BLE001
            fail(f"--config {spec}: {_last_line(e)}")
    return rest
