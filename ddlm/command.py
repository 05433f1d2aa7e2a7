"""What the command lines share: a user's mistake is one line, never a traceback.

    ddlm: error: <the flag, field or file, and what was expected>

on stderr, with exit code 2 for a mistake in the flags (found before any work) and 1 for one met while
working (a checkpoint, a data file, a config field). DDLM_TRACEBACK=1 shows the traceback instead.

    if __name__ == "__main__":
        app.run(main, flags_parser=functools.partial(command.parse_flags, config=_CONFIG))

    def main(argv):
        with command.one_line_errors():
            ...  # raise command.FlagError("--steps: ...") for a flag; ValueError / OSError name their file

Nothing here imports jax: a command that draws plots starts in a second.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import ml_collections
from absl import flags, logging


class FlagError(ValueError):
    """A mistake in a command-line flag (exit code 2); the message starts with the flag."""


def fail(message: str, code: int = 1):
    """The one line a user mistake gets (no traceback), then exit with `code`."""
    logging.flush()
    print(f"ddlm: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(errors: tuple[type[BaseException], ...] = (ValueError, OSError)):
    """Ends the process with one line for each of `errors` raised inside (the user's mistakes: every contract
    check in ddlm raises ValueError naming the field; OSError names its file): FlagError with code 2 and its
    message, the others with code 1 and their type."""
    try:
        yield
    except errors as e:
        if os.environ.get("DDLM_TRACEBACK"):
            raise
        text = " ".join(str(e).split())  # one line, whatever the message held
        if isinstance(e, FlagError):
            fail(text, 2)
        fail(f"{type(e).__name__}: {text}")


def define_log_level_flag(flag_values=flags.FLAGS):
    """--log_level: the lowest level of other libraries' log lines that a command shows (ddlm.logs)."""
    return flags.DEFINE_enum(
        "log_level",
        "warning",
        ["debug", "info", "warning", "error"],
        "Lowest level of the log lines of other libraries (orbax, jax, grain, absl, tfds) that are shown; "
        "ddlm's own lines always show (absl's --verbosity / -v sets their level). 'info' brings back "
        "orbax's per-checkpoint details.",
        flag_values=flag_values,
    )


def define_compilation_cache_flag(flag_values=flags.FLAGS):
    """--[no]compilation_cache: JAX's persistent compilation cache (ddlm.compilation_cache), on by default."""
    return flags.DEFINE_boolean(
        "compilation_cache",
        None,
        "Load compiled programs from (and save them to) JAX's persistent compilation cache: "
        "$DDLM_COMPILATION_CACHE_DIR or ~/.cache/ddlm/jax (JAX_COMPILATION_CACHE_DIR wins). Unset: on, unless "
        "DDLM_COMPILATION_CACHE=0; --nocompilation_cache: off (and a terminal's sampler progress bar counts "
        "steps again).",
        flag_values=flag_values,
    )


def config_path(argv) -> str | None:
    """The file part of --config=<file>[:arg] (or --config <file>) in `argv`."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config=") :].split(":", 1)[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def last_line_of_traceback(message: str) -> str:
    """ml_collections wraps an error raised by get_config(arg) in a message holding the whole traceback
    text; its last line ('ValueError: unknown config arg ...') is what the user needs."""
    if "Traceback (most recent call last)" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    head = lines[0].rsplit(": ", 1)[0]  # 'flag --config=experiments/x.py:arg: Error whilst parsing ...'
    return f"{head}: {lines[-1].strip()}"


def config_file_error(error: BaseException, path: str | None) -> str | None:
    """The one line for an error raised while the config file `path` was loaded: a syntax error (in it or
    in a module it imports), or an exception raised by its code (get_config or its top level): the file, the
    line and the error. None if `error` does not come from loading it (an override's, say).

    '--config: experiments/x.py line 12: SyntaxError: invalid syntax'
    '--config: experiments/x.py line 7 (get_config): KeyError: ...'"""
    if path is None:
        return None
    # ml_collections keeps a load failure of the OSError kind until the config is read, then raises
    # another OSError 'from' it: the original carries the traceback.
    while error.__cause__ is not None and not isinstance(error, SyntaxError):
        error = error.__cause__
    target = os.path.abspath(path)
    text = " ".join(str(error).split())
    if isinstance(error, SyntaxError) and error.filename:
        where = path if os.path.abspath(error.filename) == target else f"{path}: {error.filename}"
        message = " ".join((error.msg or "").split())
        return f"--config: {where} line {error.lineno}: {type(error).__name__}: {message}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == target]
    if not frames:
        return None
    frame = frames[-1]  # the innermost line of the config file on the way to the error
    where = "" if frame.name == "<module>" else f" ({frame.name})"
    return f"--config: {path} line {frame.lineno}{where}: {type(error).__name__}: {text}"


def parse_flags(argv, config=None) -> list[str]:
    """absl flag parsing (app.run's flags_parser) with each mistake reported as one line, code 2: an
    unknown flag, a value of the wrong type, a missing required flag, a positional argument, and, given
    the FlagHolder of a config_flags.DEFINE_config_file flag, a config file that does not exist or fails to
    load (a syntax error, an exception in its code: file and line named), a get_config() that returns no
    ConfigDict, a bad `:arg` of get_config and a config override that names no field or has a bad value
    (ml_collections raises AttributeError/KeyError/TypeError for those, which absl lets through)."""
    path = config_path(argv) if config is not None else None
    if path is not None and not os.path.isfile(path):
        fail(f"--config: no such config file {path!r} (expected experiments/<name>.py[:arg])", 2)
    try:
        rest = flags.FLAGS(argv)
        if config is not None:
            # A config file that failed to load raises here, at the first attribute read (ml_collections
            # defers it).
            getattr(config.value, "keys", None)
    except flags.Error as e:  # a value of the wrong type, a bad :arg, a missing required flag, ...
        if path is not None and config.present and config.value is None:  # get_config() returned None
            fail(f"--config: {path}: get_config() returned None; expected an ml_collections.ConfigDict", 2)
        fail(" ".join(last_line_of_traceback(str(e)).split()), 2)
    except Exception as e:  # noqa: BLE001 -- whatever a user's config file raises is reported, not thrown
        line = config_file_error(e, path)
        if line is not None:
            fail(line, 2)
        if isinstance(e, OSError):
            fail(f"--config: {' '.join(str(e).split())}", 2)
        if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            raise
        fail(_override_message(argv, e), 2)
    if path is not None and not isinstance(config.value, ml_collections.ConfigDict):
        returned = type(config.value).__name__
        fail(f"--config: {path}: get_config() returned {returned}; expected an ml_collections.ConfigDict", 2)
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}: every option is a flag, --name=value", 2)
    return rest


def _override_message(argv, e: Exception) -> str:
    """'bad config override --config.train.stepz: KeyError: ...', naming the override the error is about."""
    message = str(e).replace("\\n", " ").replace("\\'", "'")
    message = " ".join(message.replace("'", "").split())
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    names = [a.split("=")[0] for a in overrides]
    first_word = message.split(" ", 1)[0]
    hint = next(  # the override whose last part the message starts with ('stepz Did you mean...')
        (n for n in names if n.rsplit(".", 1)[-1] == first_word),
        next(
            (n for n in names if any(part and part in message for part in n[len("--config.") :].split("."))),
            "",
        ),
    )
    if not overrides:  # get_config itself failed
        return f"--config: get_config() raised {type(e).__name__}: {message}"
    return f"bad config override {hint or ' '.join(overrides)}: {type(e).__name__}: {message}"
