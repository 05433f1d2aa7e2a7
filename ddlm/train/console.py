"""What a job prints: ddlm's own log lines, other libraries' only from `--log_level` up, and a live
training progress bar on a terminal (plain periodic lines everywhere else).

    quiet_other_loggers("warning")  keep orbax / jax / grain / absl INFO lines (~50 per orbax checkpoint,
                                    the libtpu "Unable to initialize backend 'tpu'" line) out of the log
    progress = TrainProgress(start, total, tokens_per_step=..., flops_per_token=..., peak_flops=...)
    progress.update(step, loss)     after every step whose loss is on the host: redraws the bar
    progress.report(step, mean)     every train.log_every steps: one log line, unless the bar is live
    progress.close()

Every library here logs through Python logging into absl's one handler (orbax calls absl.logging
itself), so the filter sits on that handler and tells ddlm's records from the others by the file that
emitted them.

A checkpoint that cannot be read or written is one line (ddlm.checkpoints), but orbax runs each read or
write as an asyncio gather on a loop of its own and closes the loop as soon as one part fails: the other
parts then finish into a closed loop (tensorstore's callback raises 'Event loop is closed', reported
through sys.unraisablehook) or are collected unfinished or unretrieved (asyncio's and concurrent.futures'
error records, each with a traceback): tens to thousands of lines after the one that matters.
quiet_other_loggers also turns those reports into INFO records of the asyncio logger, shown from
`--log_level=info` on; orbax's own error records are lowered by the Checkpointer that reports them.

The bar (tqdm: well kept, handles terminal width, rate smoothing and ETA) shows the step, the loss,
tokens/s, MFU and the ETA. It is live only when its stream (stderr, where absl logs too) is a terminal
of process 0; in CI and log files the periodic `metrics.progress_line` lines are written instead.
While the bar is live, absl's log lines are written through `tqdm.write`, so an eval or checkpoint line
prints above the bar instead of through it. `update` costs a few host-side float operations per step:
the trainer passes a loss it has already fetched (the one-step-late finiteness check), so the bar adds
no device synchronisation.
"""

from __future__ import annotations

import logging as python_logging
import math
import os
import sys
import traceback

import jax
from absl import logging
from tqdm import tqdm

from ddlm.train import metrics as metrics_lib

LOG_LEVELS = ("debug", "info", "warning", "error")
_DDLM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


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


class _TqdmStream:
    """A file-like stream for absl's handler: each write goes through tqdm.write (clears the bar, writes,
    redraws)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str):
        tqdm.write(text, file=self._stream, end="")

    def flush(self):
        self._stream.flush()


class TrainProgress:
    def __init__(
        self,
        start: int,
        total: int,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        log_every: int = 0,
        stream=None,
        live: bool | None = None,
    ):
        """start: the step training resumes from (0 for a new run); total: config.train.steps;
        log_every: config.train.log_every (named in the first step's plain line).

        stream: where the bar goes (default stderr); live: draw the bar (default: stream is a terminal
        and this is process 0)."""
        self.total = total
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every = log_every
        self._first_step_pending = True
        self.stream = sys.stderr if stream is None else stream
        if live is None:
            live = jax.process_index() == 0 and _terminal_columns(self.stream) > 0
        self.live = live
        self._bar = None
        self._handler, self._saved_stream = None, None
        if live:
            self._bar = tqdm(
                total=total,
                initial=start,
                desc="train",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )
            self._handler = logging.get_absl_handler().python_handler
            self._saved_stream = self._handler.stream
            self._handler.setStream(_TqdmStream(self._saved_stream))

    def update(self, step: int, loss: float) -> None:
        """Step `step` is done and its loss is `loss` (a host float). tokens/s and MFU come from the bar's
        own smoothed rate, the one its ETA uses. Without a bar, the first step gets a line of its own: in
        a log file it shows that training has started, right after compilation, instead of only after
        log_every steps."""
        if self._bar is None:
            if self._first_step_pending:
                self._first_step_pending = False
                logging.info(
                    "step %d/%d | loss %.4f | training started; a line every config.train.log_every=%d steps",
                    step,
                    self.total,
                    loss,
                    self.log_every,
                )
            return
        steps_per_s = self._bar.format_dict["rate"] or float("nan")  # None until the bar has a rate
        tokens_per_s = steps_per_s * self.tokens_per_step
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops
        self._bar.set_postfix_str(
            f"loss {loss:.4f}, {_si(tokens_per_s)} tok/s, MFU {metrics_lib.format_percent(mfu)}",
            refresh=False,
        )
        self._bar.update(step - self._bar.n)

    def report(self, step: int, mean: dict) -> None:
        """The periodic line (train.log_every) from `mean` (loss, steps_per_s, tokens_per_s, mfu), when
        no bar is live."""
        if self.live:
            return
        logging.info(
            metrics_lib.progress_line(
                step, self.total, mean["loss"], mean["steps_per_s"], mean["tokens_per_s"], mean["mfu"]
            )
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._handler is not None:
            self._handler.setStream(self._saved_stream)
            self._handler = None


def _terminal_columns(stream) -> int:
    """The width of the terminal `stream` writes to; 0 when it is not a terminal (a file, a pipe), or a
    terminal that reports no size (some container consoles; tqdm would then draw nothing at all)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):  # no fileno/isatty, or a closed stream
        return 0


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
