"""ddlm/train/console.py: other libraries' log lines below --log_level are dropped (ddlm's are kept), so
are asyncio's reports about the work orbax abandons after a failed read or write; and the training
progress bar: live on a terminal (through a real pseudo-terminal), plain lines elsewhere."""

import fcntl
import io
import logging as python_logging
import math
import os
import pty
import struct
import sys
import termios
import time
import traceback
import types

import jax
import pytest
from absl import logging
from orbax_race import abandon_orbax_work

from ddlm.train import console


def record(pathname, level):
    return python_logging.LogRecord("absl", level, pathname, 1, "message", None, None)


@pytest.fixture
def absl_handler():
    handler = logging.get_absl_handler()
    filters, stream = list(handler.filters), handler.python_handler.stream
    yield handler
    handler.filters[:] = filters
    handler.python_handler.setStream(stream)


def test_other_libraries_info_lines_are_dropped_and_reachable_with_log_level(absl_handler):
    ddlm_file = os.path.join(os.path.dirname(console.__file__), "trainer.py")
    orbax_file = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    jax_file = (
        "/venv/lib/python3.11/site-packages/jax/_src/xla_bridge.py"  # "Unable to initialize backend 'tpu'"
    )
    lookalike = os.path.dirname(os.path.dirname(console.__file__)) + "_extra/x.py"  # .../ddlm_extra: not ddlm
    assert all(absl_handler.filter(record(f, python_logging.INFO)) for f in (orbax_file, jax_file))

    console.quiet_other_loggers("warning")
    assert absl_handler.filter(record(ddlm_file, python_logging.INFO))
    assert absl_handler.filter(record(ddlm_file, python_logging.DEBUG))
    for other in (orbax_file, jax_file, lookalike):
        assert not absl_handler.filter(record(other, python_logging.INFO)), other
        assert absl_handler.filter(record(other, python_logging.WARNING)), other

    console.quiet_other_loggers("info")  # replaces the filter, does not stack a second one
    assert absl_handler.filter(record(orbax_file, python_logging.INFO))
    assert not absl_handler.filter(record(orbax_file, python_logging.DEBUG))
    assert sum(isinstance(f, console.OtherLoggersFilter) for f in absl_handler.filters) == 1
    with pytest.raises(ValueError, match="--log_level must be one of"):
        console.quiet_other_loggers("verbose")


@pytest.fixture
def abandoned_work_hooks(monkeypatch):
    """sys.unraisablehook and the asyncio loggers' filters as they were, after the test."""
    previous = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: previous.append(unraisable))
    loggers = [python_logging.getLogger(name) for name in ("asyncio", "concurrent.futures")]
    saved = [list(logger.filters) for logger in loggers]
    yield previous
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


def test_reports_of_work_orbax_abandoned_are_info_records(absl_handler, abandoned_work_hooks):
    """Issue 21 item 5: a damaged checkpoint's one warning line came with 67 to 5,008 lines of such
    reports, a full disk with 50 tracebacks. They become INFO records of the asyncio logger (shown with
    --log_level=info); another library's unraisable exception still reaches the previous hook."""
    records = []
    capture = python_logging.Handler()
    capture.emit = records.append
    asyncio_logger = python_logging.getLogger("asyncio")
    asyncio_logger.addHandler(capture)
    try:
        console.quiet_other_loggers("warning")
        console.quiet_other_loggers("warning")  # installs the hook and the filters once
        abandon_orbax_work()  # what a failed orbax read or write leaves behind
    finally:
        asyncio_logger.removeHandler(capture)
    texts = [r.getMessage() + "".join(traceback.format_exception(*r.exc_info)) for r in records]
    assert any("Event loop is closed" in t for t in texts), texts
    assert any("Task exception was never retrieved" in t and "another damaged array file" in t for t in texts)
    assert len(records) == 2 and all(r.levelno == python_logging.INFO for r in records), texts
    assert not any(absl_handler.filter(r) for r in records)
    console.quiet_other_loggers("info")
    assert all(absl_handler.filter(r) for r in records)
    assert abandoned_work_hooks == []  # nothing reached the previous hook

    error = ValueError("a real error")
    other = types.SimpleNamespace(
        exc_type=ValueError, exc_value=error, exc_traceback=None, err_msg=None, object=None
    )
    sys.unraisablehook(other)
    assert abandoned_work_hooks == [other]


def _pty_stream(columns):
    """A writable file on a pseudo-terminal `columns` wide (0: a terminal that reports no size)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    os.set_blocking(master, False)
    return os.fdopen(slave, "w"), master


def _read(master) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def progress(stream, start=0, total=4, live=None, peak_flops=1e12):
    return console.TrainProgress(
        start,
        total,
        tokens_per_step=1000,
        flops_per_token=1e6,
        peak_flops=peak_flops,
        log_every=3,
        stream=stream,
        live=live,
    )


def test_progress_bar_is_live_on_a_terminal_with_loss_tokens_mfu_eta_and_logs_print_above_it(
    absl_handler, caplog
):
    caplog.set_level(python_logging.INFO)
    stream, master = _pty_stream(columns=160)
    original = absl_handler.python_handler.stream
    absl_handler.python_handler.setStream(stream)  # where absl logs go in a job: the same terminal
    try:
        bar = progress(stream, start=1, total=5)  # resumed at step 1
        assert bar.live
        for step in range(2, 6):
            time.sleep(0.12)  # past tqdm's minimum redraw interval (0.1 s)
            bar.update(step, 1.0 / step)
            if step == 3:
                bar.report(step, {"loss": 1.0, "steps_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.1})
                absl_handler.python_handler.stream.write("eval at step 3: a log line\n")
        bar.close()
        out = _read(master)
    finally:
        absl_handler.python_handler.setStream(original)
        stream.close()
        os.close(master)
    frames = [f for f in out.replace("\r\n", "\n").replace("\r", "\n").split("\n") if f.strip()]
    last = [f for f in frames if "train" in f][-1]
    assert "5/5" in last and "loss 0.2000" in last and "tok/s" in last and "MFU" in last, last
    assert "<00:00" in last  # tqdm's elapsed<remaining (the ETA)
    # The log line is on a line of its own (tqdm.write cleared the bar first), and the bar is redrawn
    # after it; the periodic plain line is not written while the bar is live.
    assert "eval at step 3: a log line" in frames
    log_at = frames.index("eval at step 3: a log line")
    assert any("train" in f and "loss" in f for f in frames[log_at + 1 :])
    assert not any(f.startswith("step 3/5") for f in frames) and "step 3/5" not in caplog.text


def test_progress_is_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(python_logging.INFO)
    stream, master = _pty_stream(columns=0)  # a terminal without a size: tqdm would draw nothing
    try:
        assert not progress(stream).live
    finally:
        stream.close()
        os.close(master)
    log_file = io.StringIO()
    bar = progress(log_file)
    assert not bar.live
    bar.update(1, 2.5)  # the first step: a line of its own, so a log shows training has started
    bar.update(2, 2.4)
    bar.report(4, {"loss": 2.5, "steps_per_s": 2.0, "tokens_per_s": 2000.0, "mfu": 0.002})
    bar.close()
    assert log_file.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "step 1/4 | loss 2.5000 | training started; a line every config.train.log_every=3 steps",
        "step 4/4 | loss 2.5000 | 2.00 steps/s | 2,000 tokens/s | MFU 0.20% | ETA 0s",
    ]


def test_no_mfu_without_a_known_peak(caplog):
    """Issue 22 item 4: on a CPU no peak FLOP/s is known (ddlm.train.metrics.mfu_peak says so once): the
    progress line carries no MFU figure, and the trainer writes none to the metrics."""
    from ddlm.train import metrics

    caplog.set_level(python_logging.INFO)
    bar = progress(io.StringIO(), peak_flops=float("nan"))
    bar.report(4, {"loss": 2.5, "steps_per_s": 2.0, "tokens_per_s": 2000.0})
    bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "step 4/4 | loss 2.5000 | 2.00 steps/s | 2,000 tokens/s | ETA 0s"
    ]
    peak, text = metrics.mfu_peak()  # the tests' devices are CPUs
    assert math.isnan(peak) and text == (
        "no MFU: no peak FLOP/s known for 'cpu' devices (config.train.peak_flops_per_device sets one)"
    )
    peak, text = metrics.mfu_peak(2e12)
    assert peak == 2e12 * len(jax.devices())
    assert text == "2 TFLOP/s per device (config.train.peak_flops_per_device)"
