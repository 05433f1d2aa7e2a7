"""Metrics: TensorBoard event files (via tensorboardX, no TensorFlow), a JSON-lines file, a progress line.

    <workdir>/tensorboard/events.out.tfevents.*   scalars, tag '<split>/<name>'
    <workdir>/metrics.jsonl                        one object per write: {"step", "split", name: value, ...}

Only process 0 writes. tensorboardX is used because it writes the standard event-file protobufs with only
`protobuf` and `numpy` (TensorBoard itself, or tf.summary, would pull in TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 -- closed in close()

    def write(self, step: int, split: str, scalars: dict):
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for name, value in clean.items():
            self._tb.add_scalar(f"{split}/{name}", value, global_step=step)
        record = {"step": int(step), "split": split, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self):
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


# Peak dense FLOP/s per device by `device_kind` prefix (bf16 for accelerators), for the MFU estimate.
_PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e / "TPU v5 lite"
    ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
)
# CPU: a rough float32 peak of one core with two AVX2 FMA units at ~3 GHz (2 * 2 * 8 * 3e9 ~ 1e11).
_CPU_PEAK_PER_CORE = 1e11


def peak_flops_per_second(override: float = 0.0) -> float:
    """Peak FLOP/s of all devices together (for MFU); `override` (per device) wins when positive."""
    devices = jax.devices()
    if override > 0:
        return override * len(devices)
    kind = devices[0].device_kind
    for prefix, peak in _PEAK_FLOPS:
        if kind.startswith(prefix):
            return peak * len(devices)
    if devices[0].platform == "cpu":
        # Fake CPU devices share the host's cores: the peak is the host's, whatever the device count.
        return _CPU_PEAK_PER_CORE * (os.cpu_count() or 1) * jax.process_count()
    return float("nan")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%" if math.isfinite(fraction) else "n/a"


def progress_line(
    step: int, total: int, loss: float, steps_per_s: float, tokens_per_s: float, mfu: float
) -> str:
    """The plain progress line (logs, CI; ddlm.train.progress draws a live bar on a terminal)."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    return (
        f"step {step}/{total} | loss {loss:.4f} | {steps_per_s:.2f} steps/s | {tokens_per_s:,.0f} tokens/s | "
        f"MFU {format_percent(mfu)} | ETA {format_duration(eta)}"
    )
