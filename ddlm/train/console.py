"""What a training job prints: a live progress bar on a terminal (plain periodic lines everywhere else).

    progress = TrainProgress(start, total, tokens_per_step=..., flops_per_token=..., peak_flops=...)
    progress.update(step, loss)     after every step whose loss is on the host: redraws the bar
    progress.report(step, mean)     every train.log_every steps: one log line, unless the bar is live
    progress.close()

Which other libraries' lines show (`--log_level`) is ddlm.logs' business (quiet_other_loggers, re-exported
here).

The bar (tqdm: well kept, handles terminal width, rate smoothing and ETA) shows the step, the loss,
tokens/s, MFU (where a peak FLOP/s is known: ddlm.train.metrics.mfu_peak, not on a CPU) and the ETA. It is
live only when its stream (stderr, where absl logs too) is a terminal of process 0; in CI and log files the
periodic `metrics.progress_line` lines are written instead. While the bar is live, absl's log lines are
written through `tqdm.write`, so an eval or checkpoint line prints above the bar instead of through it.
`update` costs a few host-side float operations per step: the trainer passes a loss it has already fetched
(the one-step-late finiteness check), so the bar adds no device synchronisation.
"""

from __future__ import annotations

import math
import os
import sys

import jax
from absl import logging
from tqdm import tqdm

from ddlm.logs import (  # noqa: F401 -- console.quiet_other_loggers, as before they moved to ddlm.logs
    LOG_LEVELS,
    AbandonedWorkFilter,
    OtherLoggersFilter,
    abandoned_work_unraisablehook,
    quiet_other_loggers,
)
from ddlm.train import metrics as metrics_lib


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
        text = f"loss {loss:.4f}, {_si(tokens_per_s)} tok/s"
        if math.isfinite(self.peak_flops):  # no MFU without a known peak (a CPU)
            mfu = self.flops_per_token * tokens_per_s / self.peak_flops
            text += f", MFU {metrics_lib.format_percent(mfu)}"
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(step - self._bar.n)

    def report(self, step: int, mean: dict) -> None:
        """The periodic line (train.log_every) from `mean` (loss, steps_per_s, tokens_per_s, and mfu where a
        peak is known), when no bar is live."""
        if self.live:
            return
        logging.info(
            metrics_lib.progress_line(
                step,
                self.total,
                mean["loss"],
                mean["steps_per_s"],
                mean["tokens_per_s"],
                mean.get("mfu", float("nan")),
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
