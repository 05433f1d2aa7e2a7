"""Several JAX processes on this machine, joined with jax.distributed over localhost (a cluster rehearsal).

    python launch/multiprocess.py --num_processes=2 --devices_per_process=4 -- \
        --config=experiments/quickstart.py --workdir=runs/mp --config.mesh.fsdp=2

Each process gets `--devices_per_process` fake CPU devices (XLA_FLAGS) unless --gpus is given, in which
case process i sees GPU i only (CUDA_VISIBLE_DEVICES). Everything after `--` goes to ddlm.main. The
processes' output is prefixed with [i].

Fails fast, with one line: when a process exits with an error, the others are killed at once (they would
otherwise wait in a collective until jax.distributed's heartbeat timeout), and the launcher exits with that
code; when not every process has joined jax.distributed within --start_timeout seconds (a coordinator or
key-value store that never answers), all are stopped. The same timeout goes to ddlm.main as
--distributed_timeout.

The processes die with the launcher: a kill -9 of the launcher (or its crash) SIGKILLs every process at
once (Linux: PR_SET_PDEATHSIG), rather than leaving them to train on, orphaned and unseen, where a rerun
would start a second job on the same workdir. (ddlm.main also refuses a second training job on a workdir:
ddlm/workdir_lock.py.)

Preemption: a SIGTERM (or SIGINT) to the launcher is passed on to every process, which saves a checkpoint
at the next step boundary and exits; the launcher waits up to --stop_grace seconds for that, then kills
what is left. Rerunning the same command resumes.

--dry_run (or --dry-run, as the shell launchers spell it) prints each process's command (with its
environment) and starts nothing.
"""

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ddlm.main.JOINED_LINE, printed by each process once jax.distributed.initialize() has returned.
STARTED = re.compile(r"ddlm: process \d+ of \d+ joined jax\.distributed")
# Gloo (the CPU collectives) prints one such line per rank and communicator from C++, where --log_level
# cannot reach it: dropped here unless ddlm.main is given --log_level=info or debug.
GLOO_CONNECTED = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")
# SIGTERM, then SIGKILL after this long: jax.distributed catches SIGTERM (its preemption notifier) and a
# process stuck in a collective may never act on it.
STOP_GRACE_S = 5.0


# prctl(2) option: the signal the kernel sends this process when its parent thread ends.
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def die_with_this_process():
    """A Popen preexec_fn: the child gets SIGKILL when this process ends, however it ends (Linux; elsewhere
    nothing). SIGKILL, not SIGTERM: with the launcher gone, nobody reads the processes' output or ends one
    stuck in a collective, and a kill at any point resumes from the last committed checkpoint.

    The kernel sends the signal when the *thread* that forked the child ends, so children must be
    started from the main thread; and, as with any preexec_fn, before other threads start (a lock held by
    another thread at fork would never be released in the child)."""
    if _LIBC is None:
        return None
    assert threading.current_thread() is threading.main_thread(), "PR_SET_PDEATHSIG follows the thread"
    parent = os.getpid()

    def preexec():
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts one process of the job (output piped, text), which dies with this process."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a Ctrl-C reaches the processes once, through the launcher
        preexec_fn=die_with_this_process(),
    )


def pump(i, stream, started: threading.Event, quiet: bool = True):
    for line in stream:
        if not started.is_set() and STARTED.search(line):
            started.set()
        if quiet and GLOO_CONNECTED.match(line):
            continue
        sys.stdout.write(f"[{i}] {line}")
        sys.stdout.flush()


def stop(procs, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every process still running, then SIGKILL those still there after `grace` seconds (0: SIGKILL
    at once)."""
    for p in procs:
        if p.poll() is None:
            p.terminate() if grace > 0 else p.kill()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def supervise(procs, started, start_timeout: float, poll_s: float = 0.1) -> tuple[int, str]:
    """Waits for `procs` (subprocess.Popen); `started[i]` is set once process i has joined. Returns
    (exit code, line or ''): the first non-zero exit code, after killing the others; or 1 when not every
    process started within `start_timeout` seconds, after stopping all; after a SIGTERM/SIGINT (see
    raise_on_signals), the first non-zero exit code of the processes it was passed on to, or 0; else 0."""
    t0 = time.time()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                # The others cannot finish (or checkpoint: that takes every process) without process i.
                stop(procs, grace=0)
                return code, (
                    f"process {i} exited with code {code}; stopped the other {len(procs) - 1} process(es)"
                )
            if all(c == 0 for c in codes):
                return 0, ""
            late = [i for i, s in enumerate(started) if not s.is_set() and codes[i] is None]
            if late and time.time() - t0 > start_timeout:
                stop(procs)
                return 1, (
                    f"process(es) {late} did not join jax.distributed within --start_timeout="
                    f"{start_timeout:g}s; stopped all {len(procs)} processes"
                )
            time.sleep(poll_s)
    except Preempted as e:  # SIGTERM / SIGINT: every process checkpoints at its next step and exits
        stop(procs, grace=e.grace)
        codes = [p.returncode for p in procs]
        bad = [c for c in codes if c != 0]
        return (bad[0] if bad else 0), f"stopped by signal {e.signum}: process exit codes {codes}"
    except BaseException:  # anything else: no process outlives the launcher
        stop(procs)
        raise


class Preempted(Exception):
    def __init__(self, signum: int, grace: float):
        super().__init__(signum)
        self.signum, self.grace = signum, grace


def raise_on_signals(grace: float) -> None:
    """SIGTERM and SIGINT raise Preempted in the main thread (caught by supervise)."""

    def handler(signum, frame):
        del frame
        for sig in (signal.SIGTERM, signal.SIGINT):  # one stop at a time; the grace period ends in SIGKILL
            signal.signal(sig, signal.SIG_IGN)
        raise Preempted(signum, grace)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4, help="fake CPU devices per process")
    parser.add_argument("--gpus", action="store_true", help="one GPU per process instead of fake CPU devices")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument(
        "--start_timeout",
        type=float,
        default=120.0,
        help="seconds for every process to join jax.distributed before all are stopped",
    )
    parser.add_argument(
        "--stop_grace",
        type=float,
        default=120.0,
        help="seconds the processes get to checkpoint and exit after a SIGTERM/SIGINT to the launcher",
    )
    parser.add_argument(  # --dry-run as the shell launchers spell it
        "--dry_run",
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="print the commands, start nothing",
    )
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then the ddlm.main flags")
    args = parser.parse_args()
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    address = f"localhost:{args.port or free_port()}"
    quiet = not any(a in ("--log_level=info", "--log_level=debug") for a in main_args)

    commands = []
    for i in range(args.num_processes):
        env = {}
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        else:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
        cmd = [
            sys.executable,
            "-m",
            "ddlm.main",
            *main_args,
            f"--coordinator_address={address}",
            f"--num_processes={args.num_processes}",
            f"--process_id={i}",
            f"--distributed_timeout={max(int(args.start_timeout), 1)}",
        ]
        commands.append((env, cmd))
    if args.dry_run:
        for env, cmd in commands:
            print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        return

    raise_on_signals(args.stop_grace)
    procs = []
    try:
        for env, cmd in commands:  # every process before any output thread (see die_with_this_process)
            procs.append(spawn(cmd, env))
    except BaseException:
        stop(procs, grace=0)
        raise
    started = [threading.Event() for _ in procs]
    threads = [
        threading.Thread(target=pump, args=(i, p.stdout, started[i], quiet), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in threads:
        t.start()
    code, error = supervise(procs, started, args.start_timeout)
    for t in threads:  # the processes' last lines come before the launcher's verdict
        t.join(timeout=5)
    if error:
        print(f"launch/multiprocess.py: {'error: ' if code else ''}{error}", file=sys.stderr, flush=True)
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal k: 128 + k, as a shell reports it


if __name__ == "__main__":
    main()
