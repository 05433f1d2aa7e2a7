"""Which log lines a command shows: ddlm's own always, other libraries' (orbax, jax, grain, absl, tfds) only
from `--log_level` up (default 'warning'), so a job's log holds what it did and what went wrong, not the ~50
INFO lines orbax writes per checkpoint or jax's "Unable to initialize backend 'tpu'".

    quiet_other_loggers("warning")   every command line's first call (ddlm.main, ddlm.eval.frontier)

Every library here logs through Python logging into absl's one handler (orbax calls absl.logging itself), so
the filter sits on that handler and tells ddlm's records from the others by the file that emitted them.

A checkpoint that cannot be read or written is one line (ddlm.checkpoints), but orbax runs each read or
write as an asyncio gather on a loop of its own and closes the loop as soon as one part fails: the other
parts then finish into a closed loop (tensorstore's callback raises 'Event loop is closed', reported
through sys.unraisablehook) or are collected unfinished or unretrieved (asyncio's and concurrent.futures'
error records, each with a traceback): tens to thousands of lines after the one that matters.
quiet_other_loggers also turns those reports into INFO records of the asyncio logger, shown from
`--log_level=info` on; orbax's own error records are lowered by the Checkpointer that reports them.

Nothing here imports jax: a command imports it only when it has work to do.
"""

from __future__ import annotations

import logging as python_logging
import os
import sys
import traceback

from absl import logging

LOG_LEVELS = ("debug", "info", "warning", "error")
_DDLM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OtherLoggersFilter(python_logging.Filter):
    """Passes every record emitted by a file of the ddlm package, and other records from `level` up."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.pathname.startswith(_DDLM_DIR)


def quiet_other_loggers(level: str = "warning") -> OtherLoggersFilter:
    """Installs (or replaces) an OtherLoggersFilter at `level` (one of LOG_LEVELS) on absl's handler,
    which every Python logger reaches through the root logger; and, once, the AbandonedWorkFilter and the
    unraisable hook that make asyncio's reports about orbax's abandoned work INFO records."""
    if level not in LOG_LEVELS:
        raise ValueError(f"--log_level must be one of {LOG_LEVELS}, got {level!r}")
    handler = logging.get_absl_handler()
    for old in [f for f in handler.filters if isinstance(f, OtherLoggersFilter)]:
        handler.removeFilter(old)
    new = OtherLoggersFilter(getattr(python_logging, level.upper()))
    handler.addFilter(new)
    for name in _ABANDONED_LOGGERS:
        logger = python_logging.getLogger(name)
        if not any(isinstance(f, AbandonedWorkFilter) for f in logger.filters):
            logger.addFilter(AbandonedWorkFilter())
    if not getattr(sys.unraisablehook, "ddlm_abandoned_work", False):
        sys.unraisablehook = abandoned_work_unraisablehook(sys.unraisablehook)
    return new


# What asyncio (and concurrent.futures, whose callbacks asyncio.wrap_future uses) log about work left
# behind when an event loop stopped early.
_ABANDONED_LOGGERS = ("asyncio", "concurrent.futures")
_ABANDONED_MESSAGES = (
    "Task exception was never retrieved",
    "Future exception was never retrieved",
    "Task was destroyed but it is pending",
    "Exception in callback",
    "exception calling callback for",
)


class AbandonedWorkFilter(python_logging.Filter):
    """On the asyncio and concurrent.futures loggers: their reports about abandoned tasks, futures and
    callbacks become INFO records (asyncio serves only orbax here, whose failures ddlm reports itself)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.levelno > python_logging.INFO and str(record.msg).startswith(_ABANDONED_MESSAGES):
            record.levelno, record.levelname = python_logging.INFO, "INFO"
        return True


def abandoned_work_unraisablehook(previous):
    """A sys.unraisablehook that logs a callback into a closed event loop (tensorstore completing a read
    or write that orbax abandoned) and any unraisable raised in orbax's or tensorstore's code as an INFO
    record of the asyncio logger, with its traceback; everything else goes to `previous`."""

    def hook(unraisable):
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = traceback.extract_tb(tb) if tb is not None else []
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        from_orbax = any(_is_orbax(f.filename) for f in frames) or _is_orbax(repr(unraisable.object))
        if not (closed_loop or from_orbax):
            previous(unraisable)
            return
        where = frames[-1] if frames else None
        record = python_logging.LogRecord(
            "asyncio",
            python_logging.INFO,
            where.filename if where else "",
            where.lineno if where else 0,
            "Exception ignored in %r (work abandoned when an event loop stopped early)",
            (unraisable.object,),
            (unraisable.exc_type, exc, tb),
        )
        python_logging.getLogger("asyncio").handle(record)

    hook.ddlm_abandoned_work = True
    return hook


def _is_orbax(text: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in text or f"{os.sep}tensorstore{os.sep}" in text
