"""The scripts' error wrapper: the project's own errors end in one line on stderr and exit code 2.

An error is the user's to fix when it is one of ours (DataError, CheckpointError, ConfigError,
WorkdirBusyError, a diverged run's FloatingPointError) or a ValueError / KeyError / OSError raised by our
own code (a boundary check) rather than by a library. It is printed as `error: <message>` (only the
message: grain's trailing note is dropped); anything else keeps its traceback. `--debug` on the command
line or LQSEG_DEBUG=1 in the environment shows the traceback of every error.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def _our_folders() -> tuple[str, ...]:
    """Where our code lives (editable or installed): the packages and the running script's folder."""
    from . import data_pipelines, kernels

    folders = [Path(m.__file__).resolve().parent for m in (data_pipelines, kernels)]
    folders.append(Path(__file__).resolve().parent)
    if sys.argv and sys.argv[0].endswith(".py"):
        folders.append(Path(sys.argv[0]).resolve().parent)  # scripts/
    return tuple(f"{f}{os.sep}" for f in folders)


def debug_requested(argv: list[str] | None = None) -> bool:
    """LQSEG_DEBUG=1, or --debug on the command line (or in `argv`)."""
    args = [*sys.argv[1:], *(argv or [])]
    return os.environ.get("LQSEG_DEBUG", "") not in ("", "0") or "--debug" in args or "--debug=true" in args


def _own_error_types() -> tuple[type, ...]:
    from .convert.common import CheckpointError
    from .data_pipelines.sources import DataError
    from .train.config import ConfigError
    from .train.workdir_lock import WorkdirBusyError

    return CheckpointError, DataError, ConfigError, WorkdirBusyError, FloatingPointError


def _raised_by_us(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    return str(Path(frames[-1].filename).resolve()).startswith(_our_folders())


def user_error(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s cause chain that is the user's to fix (see the module docstring), if any."""
    own = _own_error_types()
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, own):
            return exc
        if isinstance(exc, ValueError | KeyError | OSError) and _raised_by_us(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (without notes, without KeyError's quotes)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


def report_errors(main: Callable) -> Callable:
    """Decorates a script's main(): the user's errors (see `user_error`) -> `error: ...` on stderr, exit 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        argv = args[0] if args and isinstance(args[0], list | tuple) else None
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            found = user_error(exc)
            if found is None or debug_requested(None if argv is None else [str(a) for a in argv]):
                raise
            print(f"error: {one_line(found)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapped


def add_debug_flag(parser) -> None:
    """`--debug` for an argparse script (shows tracebacks; same as LQSEG_DEBUG=1)."""
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of errors (or LQSEG_DEBUG=1)"
    )


def _argv_config(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """(the --NAME FILE[:ARG] value, the dotted keys of the --NAME.KEY overrides) in `argv`."""
    spec, keys = None, []
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(f"--{name}."):
            keys.append(arg[len(name) + 3 :].split("=", 1)[0])
    return spec, keys


def flag_config(name: str = "config"):
    """The ConfigDict of an ml_collections config flag; its loading errors (a missing file, an unknown
    `--config.key`, a bad variant) -> ConfigError naming the flag, the file or key and what was expected."""
    from absl import flags

    try:
        config = flags.FLAGS[name].value
        config.keys()  # a config file that failed to load raises on first use
        return config
    except Exception as e:
        _explain_config_error(e, name)
        raise


def _config_flag_problem(name: str) -> Exception | None:
    """What is wrong with the config flag's file or override keys (a missing file, an unknown --config.key
    with the close names, or the error its file raises when loaded); None when nothing is."""
    from .train.config import ConfigError, check_override_keys, load_config

    spec, keys = _argv_config(sys.argv[1:], name)
    if spec is None:
        return None
    path = Path(spec.partition(":")[0])
    if not path.is_file():
        return ConfigError(f"--{name}: config file {path.absolute()} does not exist")
    try:
        check_override_keys(load_config(spec), keys, flag=f"--{name}")
    except Exception as e:
        return e
    return None


def _explain_config_error(e: BaseException, name: str) -> None:
    """Raises ConfigError for a config flag that failed to load or to take an override, if it can tell why."""
    from .train.config import ConfigError

    spec, _ = _argv_config(sys.argv[1:], name)
    if spec is None:
        return
    problem = _config_flag_problem(name)
    if isinstance(problem, ConfigError):
        raise problem from e
    raise ConfigError(f"--{name} {spec}: {_first_line(problem or e)}") from e


def setup_logging() -> None:
    """The console every script shares: lqseg-jax's INFO lines (periodic evaluation mIoU, pretrained weights
    loaded, resume details) on stderr, third-party loggers (absl, orbax, jax, grain) at WARNING and above.

    absl's own handler is taken off the root logger (app.run puts it there) so that each line is printed
    once, in one format; calling this again changes nothing.
    """
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every save and read at INFO
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("lqseg_jax").setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a line is written (a test may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def _flag_error_line(e: BaseException, config_flag: str) -> str:
    """One line for an absl flag parsing error: the flag and what was wrong, with the close names of an
    unknown flag or the type a config field takes."""
    import difflib

    from absl import flags

    message = _first_line(e)
    fields: dict = {}
    spec, _ = _argv_config(sys.argv[1:], config_flag)
    if spec is not None:
        problem = _config_flag_problem(config_flag)
        if problem is not None:
            found = user_error(problem)
            return one_line(found) if found is not None else f"--{config_flag} {spec}: {_first_line(problem)}"
        from .train.config import load_config

        fields = _dotted_values(load_config(spec), f"--{config_flag}.")
    if isinstance(e, flags.UnrecognizedFlagError):
        name = f"--{e.flagname}"
        known = [f"--{n}" for n in flags.FLAGS if n not in ("helpshort", "helpfull", "helpxml")]
        close = difflib.get_close_matches(name, [*known, *fields], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else f" (see {sys.argv[0]} --helpfull)"
        return f"unknown flag {name}{hint}"
    for key, value in sorted(fields.items(), key=lambda kv: -len(kv[0])):  # the longest key that matches
        if f"flag {key}=" in message:
            kind = _KINDS.get(type(value), f"a {type(value).__name__}")
            return f"{message} (expected {kind}, like {key}={value!r})"
    return re.sub(r"^flags [^:]*: ", "", message)  # a multi-flag validator's message names the flags itself


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a tuple"}


def _dotted_values(config, prefix: str) -> dict:
    """{"PREFIXa.b": value} for every leaf field of `config`."""
    import ml_collections

    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_dotted_values(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_absl(main: Callable, config_flag: str = "config") -> None:
    """absl's app.run(main) for a script with an ml_collections config flag: a flag that fails while the
    flags are parsed (an unknown flag or --config.key, a value of the wrong type, a missing config file) ends
    in one line too, naming the flag and the close names or the expected type."""
    from absl import app, flags

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            if debug_requested():
                raise
            print(f"error: {_flag_error_line(e, config_flag)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    try:
        app.run(main, flags_parser=parse)
    except Exception as exc:
        if debug_requested():
            raise
        try:
            _explain_config_error(exc, config_flag)
        except Exception as explained:
            found = user_error(explained)
            if found is None:
                raise
            print(f"error: {one_line(found)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


def check_output_outside_input(
    out: str | Path, src: str | Path, flag: str = "--out", src_flag: str = "--root"
):
    """Refuses an output that is the input, lies inside it or holds it: a dataset-writing script never
    writes into its input."""
    o, r = Path(out).resolve(), Path(src).resolve()
    if o == r or r in o.parents or o in r.parents:
        raise ValueError(
            f"{flag} {Path(out).absolute()} is, lies inside or holds {src_flag} {Path(src).absolute()}; writing "
            "there would change the input (expected a separate output folder)"
        )
