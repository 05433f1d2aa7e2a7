"""launch/multiprocess.py fails fast: a process that dies stops its siblings at once (they would wait
minutes in a collective or at shutdown), and processes that never join jax.distributed are stopped after
--start_timeout. Stand-in processes (python -c) play the ddlm.main processes."""

import importlib.util
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher():
    spec = importlib.util.spec_from_file_location(
        "multiprocess", os.path.join(REPO, "launch", "multiprocess.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(mp, code: str):
    """A stand-in process running `code`, its output pumped (and its start-up line detected) as the
    launcher does."""
    p = subprocess.Popen(
        [sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    event = threading.Event()
    thread = threading.Thread(target=mp.pump, args=(0, p.stdout, event), daemon=True)
    thread.start()
    p.pump_thread = thread
    return p, event


def joined_line():
    from ddlm import main

    return main.JOINED_LINE.format(index=0, count=2)


# What each ddlm.main process prints once jax.distributed.initialize() has returned.
JOINED = f"print({joined_line()!r})"


def test_a_dying_process_stops_its_siblings_at_once():
    mp = launcher()
    waiting, w_started = start(mp, f"{JOINED}; import time; time.sleep(120)")  # stuck in a collective
    dying, d_started = start(mp, f"{JOINED}; import time, sys; time.sleep(0.5); sys.exit(3)")
    t0 = time.time()
    code, error = mp.supervise([waiting, dying], [w_started, d_started], start_timeout=60)
    assert code == 3 and error == "process 1 exited with code 3; stopped the other 1 process(es)"
    assert waiting.poll() is not None  # stopped, not left running
    assert time.time() - t0 < 30
    assert w_started.is_set() and d_started.is_set()


def test_processes_that_never_join_are_stopped_after_the_start_timeout():
    mp = launcher()
    joined, j_started = start(mp, f"{JOINED}; import time; time.sleep(120)")
    stuck, s_started = start(mp, "import time; time.sleep(120)")  # a key-value store that never answers
    t0 = time.time()
    code, error = mp.supervise([joined, stuck], [j_started, s_started], start_timeout=2)
    assert code == 1 and "process(es) [1] did not join jax.distributed within --start_timeout=2s" in error
    assert joined.poll() is not None and stuck.poll() is not None
    assert 2 <= time.time() - t0 < 30


def test_processes_that_succeed_exit_zero_and_gloo_connection_lines_are_dropped(capsys):
    mp = launcher()
    gloo = (
        "print('[Gloo] Rank 1 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7')"
    )
    procs = [
        start(mp, f"{JOINED}; {gloo}; print('step {d}'); import time; time.sleep({d})") for d in (0.2, 0.6)
    ]
    code, error = mp.supervise([p for p, _ in procs], [e for _, e in procs], start_timeout=60)
    assert (code, error) == (0, "")
    for p, _ in procs:
        p.pump_thread.join(timeout=10)
    out = capsys.readouterr().out
    assert "[0] step 0.2" in out and "[0] step 0.6" in out and "joined jax.distributed" in out
    assert "Gloo" not in out
