"""Metrics: TensorBoard event files (via tensorboardX, no TensorFlow), a JSON-lines file, a progress line.

    <workdir>/tensorboard/events.out.tfevents.*   scalars, tag '<split>/<name>'
    <workdir>/metrics.jsonl                        one object per write: {"step", "split", name: value, ...}

Only process 0 writes. tensorboardX is used because it writes the standard event-file protobufs with only
`protobuf` and `numpy` (TensorBoard itself, or tf.summary, would pull in TensorFlow). Its low-level
`EventsWriter` is used directly, synchronously: the SummaryWriter queues events for a background process
and its flush() does not wait for that queue, so scalars written before a checkpoint could be lost by a
kill after the checkpoint committed. Here flush() puts every scalar written so far on disk.

A resumed run (resume_step=N) rewrites metrics.jsonl without the rows past step N (atomically) and starts
its event file with a TensorBoard 'purge' at step N+1, so each step appears once in both.

A workdir in a bucket (gs://...; ddlm.paths) cannot be appended to: both files are written in a local
staging folder and copied into the workdir by flush() (before every checkpoint) and close().
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from ddlm import paths


class MetricWriter:
    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self._events = None
        self._jsonl = None
        self._remote = paths.is_remote(workdir)
        self._workdir = paths.resolve(workdir)
        self._local = None
        if self.enabled:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2

            # A bucket: write here, copy there (see the module docstring).
            self._local = tempfile.mkdtemp(prefix="ddlm-metrics-") if self._remote else self._workdir
            tb_dir = os.path.join(self._local, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            path = os.path.join(self._local, "metrics.jsonl")
            remote_jsonl = paths.path(self._workdir, "metrics.jsonl")
            if self._remote and remote_jsonl.exists():
                remote_jsonl.copy(path, overwrite=True)
            if resume_step is not None:
                drop_rows_after(path, resume_step)
            # The pid keeps two writers started in the same second from sharing a file name.
            self._events = EventsWriter(os.path.join(tb_dir, "events"), f".{os.getpid()}")
            if resume_step is not None:
                # TensorBoard drops the events of earlier files at steps >= this one (the interrupted run's).
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                self._events.write_event(
                    event_pb2.Event(step=resume_step + 1, wall_time=time.time(), session_log=start)
                )
            self._jsonl_path = path
            self._jsonl = open(path, "a")  # noqa: SIM115 -- closed in close()
            if self._remote:
                self._upload()

    def write(self, step: int, split: str, scalars: dict, *, replace: bool = False):
        """One row of `scalars` at (step, split). replace: an earlier row of the same step and split leaves
        metrics.jsonl first (atomically), so a command rerun on one checkpoint (--mode=eval) keeps one row;
        TensorBoard's event file has no delete, and shows the later point."""
        if not self.enabled:
            return
        if replace:
            self._jsonl.close()
            _keep_rows(self._jsonl_path, lambda row: (row.get("step"), row.get("split")) != (int(step), split))
            self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115 -- closed in close()
        from tensorboardX.proto import event_pb2, summary_pb2

        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v) for k, v in clean.items()]
        )
        self._events.write_event(event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary))
        record = {"step": int(step), "split": split, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self):
        """Every scalar written so far reaches the files (the event file is fsync'ed), in the workdir."""
        if self.enabled and self._events is not None:
            self._events.flush()
            self._jsonl.flush()
            if self._remote:
                self._upload()

    def close(self):
        if self.enabled and self._events is not None:
            self._events.close()
            self._jsonl.close()
            self._events = None
            if self._remote:
                self._upload()
                shutil.rmtree(self._local, ignore_errors=True)

    def _upload(self):
        """Copies the staged files into the bucket workdir (whole files: a bucket has no append)."""
        for root, _, files in os.walk(self._local):
            for name in files:
                local = os.path.join(root, name)
                target = paths.path(self._workdir, os.path.relpath(local, self._local))
                target.parent.mkdir(parents=True, exist_ok=True)
                paths.path(local).copy(target, overwrite=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the JSON-lines file `path` without its rows whose step is past `step` (and any torn last
    line of a killed writer), atomically (a temporary file renamed over it). Returns the rows dropped."""
    return _keep_rows(path, lambda row: int(row.get("step", 0)) <= step)


def _keep_rows(path: str, keep) -> int:
    """Rewrites the JSON-lines file `path` with only its rows for which keep(row) holds (a torn last line of a
    killed writer goes too), atomically (a temporary file renamed over it). Returns the rows dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(row):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return 0
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


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


def mfu_peak(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, what it is) for the MFU figure of the training log: `override`
    (config.train.peak_flops_per_device) when positive, else the table's bf16 dense peak of the device kind;
    (nan, why) where none is known, a CPU included: its peak depends on the cores, vector units and clock,
    and fake CPU devices share the host's cores, so a figure against a guessed peak (peak_flops_per_second's
    rough estimate, kept for the benchmarks) would read as a measurement it is not."""
    devices = jax.devices()
    n = len(devices)
    if override > 0:
        return override * n, f"{override / 1e12:.4g} TFLOP/s per device (config.train.peak_flops_per_device)"
    kind = devices[0].device_kind
    for prefix, peak in _PEAK_FLOPS:
        if kind.startswith(prefix):
            return peak * n, f"{peak / 1e12:.4g} TFLOP/s per device ({kind}, bf16 dense peak)"
    return float("nan"), (
        f"no MFU: no peak FLOP/s known for {kind!r} devices (config.train.peak_flops_per_device sets one)"
    )


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
    """The plain progress line (logs, CI; ddlm.train.console draws a live bar on a terminal); without MFU
    where it is nan (no known peak, see mfu_peak)."""
    eta = (total - step) / steps_per_s if steps_per_s > 0 else float("inf")
    mfu_part = f"MFU {format_percent(mfu)} | " if math.isfinite(mfu) else ""
    return (
        f"step {step}/{total} | loss {loss:.4f} | {steps_per_s:.2f} steps/s | {tokens_per_s:,.0f} tokens/s | "
        f"{mfu_part}ETA {format_duration(eta)}"
    )
