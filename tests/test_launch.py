"""launch/multiprocess.py fails fast: a process that dies stops its siblings at once (they would wait
minutes in a collective or at shutdown), and processes that never join jax.distributed are stopped after
--start_timeout. Stand-in processes (python -c) play the ddlm.main processes; the last test kills the
launcher of a real two-process job: its processes die with it."""

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import deadlines
import pytest

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


def test_dry_run_is_spelled_either_way_and_starts_nothing(tmp_path):
    """--dry_run and --dry-run (the shell launchers' spelling) print the same per-process commands and start
    nothing (no workdir appears)."""
    outs = []
    for flag in ("--dry_run", "--dry-run"):
        r = subprocess.run(
            [sys.executable, os.path.join(REPO, "launch", "multiprocess.py"), flag, "--num_processes=2"]
            + [
                "--port=12345",
                "--",
                "--config=experiments/quickstart.py:smoke",
                f"--workdir={tmp_path / 'w'}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.splitlines())
    assert outs[0] == outs[1] and len(outs[0]) == 2
    for i, line in enumerate(outs[0]):
        assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=")
        assert f"-m ddlm.main --config=experiments/quickstart.py:smoke --workdir={tmp_path / 'w'}" in line
        assert line.endswith(
            f"--coordinator_address=localhost:12345 --num_processes=2 --process_id={i}"
            " --distributed_timeout=120"
        )
    assert not (tmp_path / "w").exists()


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.timeout(300)
def test_a_killed_launcher_takes_its_processes_along_and_a_second_job_was_refused(tmp_path):
    """kill -9 of launch/multiprocess.py while its two ddlm.main processes train: both are gone within
    seconds (they would train on, orphaned), and the workdir's lock with them. Before that, a second
    training job on the workdir is refused with one line naming the holder, process 0 of the first."""
    from test_main import QUICKSTART, TINY_OVERRIDES

    from ddlm import workdir_lock

    work = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    launcher = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch", "multiprocess.py"), "--num_processes=2"]
        + ["--devices_per_process=1", "--", f"--config={QUICKSTART}", f"--workdir={work}", *TINY_OVERRIDES]
        + ["--config.train.steps=100000"],  # trains until killed
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
    joined = re.compile(r"process (\d) of 2 joined jax\.distributed \(host \S+, pid (\d+),")
    pids = {}  # process index: pid, from each process's joined line
    try:
        deadline = time.monotonic() + deadlines.scaled(240)
        while len(pids) < 2 or workdir_lock.holder(work) is None:
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            pids = {int(i): int(pid) for i, pid in joined.findall("".join(lines))}
            time.sleep(0.1)
        held_by = workdir_lock.holder(work)
        assert held_by.startswith(f"pid {pids[0]} on host {socket.gethostname()}, process 0 of 2, since ")

        second = subprocess.run(
            [sys.executable, "-m", "ddlm.main", f"--config={QUICKSTART}", f"--workdir={work}"]
            + TINY_OVERRIDES,
            cwd=REPO,
            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
            capture_output=True,
            text=True,
            timeout=deadlines.scaled(240),
            check=False,
        )
        assert second.returncode == 1, second.stderr[-3000:]
        assert second.stderr.splitlines()[-1] == (
            f"ddlm: error: WorkdirInUse: --workdir {work} is in use by another training job ({held_by}): "
            "wait for it to end or stop it, or train in another --workdir"
        )

        assert all(running(p) for p in pids.values()), "".join(lines)[-3000:]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        # (A killed process shows as a zombie while its other threads still exit and hold its files.)
        deadline = time.monotonic() + 30
        while any(running(p) for p in pids.values()) or workdir_lock.holder(work) is not None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not [p for p in pids.values() if running(p)], "the launcher's processes outlived it"
        assert workdir_lock.holder(work) is None
    finally:
        for p in [launcher.pid, *pids.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        launcher.wait(timeout=30)
