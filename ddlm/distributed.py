"""Multi-process jobs: how the processes find each other, what each says once, and how one dies cleanly.

    plan = detect(environ, coordinator_address=..., num_processes=..., process_id=..., force=None)
    start(plan, init_timeout=300, heartbeat_timeout=30, collective_timeout=600)
                                                           jax.distributed.initialize(); nothing for None
    wait_for_all('the first train step')                   a barrier bounded by --collective_timeout
    process_line(plan) -> 'ddlm: process 1 of 2 joined jax.distributed (host h, pid 7, ...)'
    is_main_process()                                      process 0: the one that logs and writes files
    StopRequest()                                          SIGTERM -> stop at the next step boundary, everywhere

Where the processes come from (`detect`, first match wins):

  1. flags: --coordinator_address, --num_processes and --process_id (launch/multiprocess.py passes them);
  2. SLURM: srun's variables (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID and more than
     one task in SLURM_STEP_NUM_TASKS or SLURM_NTASKS): jax reads the coordinator (first node of the step,
     a port from the job id) and the process id from them;
  3. TPU pods: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) naming more than one worker (GKE, and
     `gcloud ... --worker=all`, where launch/tpu_pod.sh also passes --distributed): jax reads the
     pod's topology (from the metadata server on Cloud TPU VMs);
  4. --distributed forces jax's own detection (any cluster jax knows); --nodistributed forces none.

A single process (none of the above) never calls jax.distributed.

Failure: jax.distributed's coordination service notices a process that stops sending heartbeats within
`heartbeat_timeout` seconds (the coordinator's death at once), and then ends every other process from a
C++ thread: a fatal log line, a stack dump of ~15 lines, SIGABRT. Nothing in Python can catch it (the
client's callback cannot be replaced from Python in jaxlib 0.10.2: its status argument fails to convert),
so `start` routes this process's stderr through a small filter process (this file run as a script)
that turns that block into one line

    ddlm: error: process 0 of 2: process 1 stopped sending heartbeats (died, was killed or preempted, ...

and passes everything else through unchanged. The process still exits non-zero (SIGABRT, 134).

Collectives (CPU: Gloo) have two deadlines. An operation (an all-reduce of a step) waits
`collective_timeout` seconds for the other processes (XLA's --xla_cpu_collective_timeout_seconds, which
`start` sets). But the connection that Gloo sets up at the first collective of each group of devices
gives up after a fixed 30 s (jaxlib 0.10.2 sets no other): processes that reach their first step more
than 30 s apart (one compiled slower, under load) fail there. So the trainer waits at `wait_for_all`
(a barrier of the coordination service, bounded by `collective_timeout`) between compiling and the first
step. A collective or barrier that times out ends the process with one line naming it (`start` installs
an excepthook; `summarize_runtime_error`), not with a traceback followed by the shutdown barrier's own
failure, which used to read as 'not every process joined'.

Preemption: `StopRequest.reached(step)` is called at every step boundary; after a SIGTERM it returns True
at the same step on every process (jax's preemption sync point: the notice of any process reaches all,
and they agree on the step after the furthest one), so every process saves the same checkpoint and exits.
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

# Printed (not logged: --verbosity cannot hide it) by each process of a multi-process job once it has
# joined; launch/multiprocess.py waits for it (--start_timeout) and the tests read the host and devices.
JOINED_LINE = "ddlm: process {index} of {count} joined jax.distributed"
# --collective_timeout's default (seconds): XLA's own default is 1800 s; a peer that is 10 minutes late
# for a collective is stuck, not slow.
COLLECTIVE_TIMEOUT_S = 600
# Gloo's connection set-up deadline (the first collective of each device group): fixed in jaxlib 0.10.2.
GLOO_CONNECT_DEADLINE_S = 30


class DistributedConfigError(ValueError):
    """Flags or cluster variables that cannot start a job; one line naming them."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the job: `source` is 'flags', 'slurm', 'tpu' or 'forced'; the address and
    counts are given only with 'flags' (jax finds them itself otherwise)."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_env(environ, name: str) -> int:
    try:
        return int(environ.get(name, "") or 0)
    except ValueError:
        raise DistributedConfigError(f"{name}={environ[name]!r} is not an integer") from None


def detect(
    environ=None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool | None = None,
) -> Plan | None:
    """The Plan for this process, or None for a single-process job (see the module docstring).

    force: True (--distributed) = let jax detect the cluster; False (--nodistributed) = never join;
    None = detect from the flags and `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    explicit = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given:
        missing = [name for name in explicit if name not in given]
        if missing:
            raise DistributedConfigError(
                f"{', '.join(given)} given without {', '.join(missing)}: a multi-process job needs all three"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedConfigError(
                f"--process_id={process_id} must lie in [0, --num_processes={num_processes})"
            )
        if ":" not in coordinator_address:
            raise DistributedConfigError(
                f"--coordinator_address={coordinator_address!r} must be host:port (the host of process 0)"
            )
        if force is False:
            raise DistributedConfigError("--nodistributed contradicts --coordinator_address/--num_processes")
        if num_processes == 1:
            return None
        return Plan("flags", coordinator_address, num_processes, process_id)
    if force is False:
        return None
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm_vars):
        tasks = _int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
        if tasks > 1:
            return Plan("slurm")
    workers = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1:
        return Plan("tpu")
    return Plan("forced") if force else None


@dataclasses.dataclass
class _Job:
    """What `start` was given, for wait_for_all and the excepthook (one per process)."""

    label: str = "process 0 of 1"
    collective_timeout: int = COLLECTIVE_TIMEOUT_S
    barriers: int = 0  # barriers passed so far: each gets its own id


_job = _Job()


def start(
    plan: Plan | None,
    *,
    init_timeout: int = 300,
    heartbeat_timeout: int = 30,
    collective_timeout: int = COLLECTIVE_TIMEOUT_S,
) -> None:
    """Joins the job described by `plan` (nothing for None): routes stderr through the failure filter,
    then jax.distributed.initialize() with these timeouts (seconds), then prints process_line() once.

    init_timeout: how long to wait for every process to join (and, at exit, for all to finish);
    heartbeat_timeout: a process silent this long is dead, and every other one then exits non-zero;
    collective_timeout: how long a collective operation or wait_for_all waits for the other processes."""
    if plan is None:
        return
    for name, value in (
        ("--distributed_timeout", init_timeout),
        ("--heartbeat_timeout", heartbeat_timeout),
        ("--collective_timeout", collective_timeout),
    ):
        if value < 1:
            raise DistributedConfigError(f"{name} must be an integer >= 1 (seconds), got {value}")
    # Read by XLA when the CPU backend is created, which jax.distributed.initialize() must precede.
    os.environ["XLA_FLAGS"] = with_collective_timeout(os.environ.get("XLA_FLAGS", ""), collective_timeout)
    _job.label, _job.collective_timeout = _label(plan), collective_timeout
    guard_stderr(plan, heartbeat_timeout, init_timeout, collective_timeout)
    sys.excepthook = _excepthook(sys.excepthook)
    import jax

    kwargs = {}
    if plan.source == "flags":
        kwargs = {
            "coordinator_address": plan.coordinator_address,
            "num_processes": plan.num_processes,
            "process_id": plan.process_id,
        }
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=init_timeout,
    )
    print(process_line(plan), flush=True)


def with_collective_timeout(xla_flags: str, seconds: int) -> str:
    """`xla_flags` (the XLA_FLAGS string) with --xla_cpu_collective_timeout_seconds=`seconds` in place of
    any value it had."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_cpu_collective_timeout_seconds=")]
    return " ".join([*kept, f"--xla_cpu_collective_timeout_seconds={seconds}"])


def process_line(plan: Plan | None = None) -> str:
    """The line each process prints once: its rank, host, pid and devices, and how it found the job."""
    import jax

    local = jax.local_devices()
    ids = [d.id for d in local]
    span = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[0] + len(ids))) else ",".join(map(str, ids))
    head = JOINED_LINE.format(index=jax.process_index(), count=jax.process_count())
    return (
        f"{head} (host {socket.gethostname()}, pid {os.getpid()}, {len(local)} local "
        f"{local[0].platform} devices [{span}] of {jax.device_count()}, found by "
        f"{plan.source if plan else 'none'})"
    )


def is_main_process() -> bool:
    """Process 0 logs, writes metrics and samples; the others compute and checkpoint their shards."""
    import jax

    return jax.process_index() == 0


def collective_timeout() -> int:
    """--collective_timeout (seconds) as given to `start`."""
    return _job.collective_timeout


class CollectiveTimeout(RuntimeError):
    """A collective or a barrier of a multi-process job timed out; the message is one line naming it."""


def wait_for_all(what: str) -> None:
    """Returns once every process of the job has called it (nothing to wait for with one process), or
    raises CollectiveTimeout naming the late processes after --collective_timeout seconds. `what` names
    the place, e.g. 'the first train step' (the same on every process, in the same order)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    _job.barriers += 1
    barrier_id = f"ddlm_{_job.barriers}_{re.sub(r'[^a-z0-9]+', '_', what.lower())}"
    try:
        jax_distributed.global_state.client.wait_at_barrier(barrier_id, _job.collective_timeout * 1000)
    except jax.errors.JaxRuntimeError as e:
        summary = summarize_runtime_error(str(e), _job.collective_timeout, where=what)
        raise CollectiveTimeout(summary or " ".join(str(e).split())[:300]) from None


def summarize_runtime_error(text: str, collective_timeout: int, where: str | None = None) -> str | None:
    """The few words for the error a collective or a barrier raised when another process did not come or
    left (text: its message, a JaxRuntimeError's or the ValueError jax makes of some), naming the deadline
    that ran out; None for any other error. where: what wait_for_all waited for (its barrier)."""
    flat = " ".join(text.split())
    flag = f"--collective_timeout={collective_timeout}s"
    late = "slower: still compiling, overloaded or stuck, or dead; see its output"
    m = re.search(r"Gloo context initialization failed: .*?(?:timed out|DEADLINE_EXCEEDED)", flat)
    if m:
        d = re.search(r"duration: ([\d.]+)s", flat)
        waited = f"{float(d.group(1)):.0f}s" if d else f"{GLOO_CONNECT_DEADLINE_S}s"
        return (
            f"a collective timed out: Gloo's connection set-up (at a program's first collective) gave up "
            f"after {waited} waiting for another process ({late}); jaxlib fixes this deadline, unlike "
            f"{flag}"
        )
    m = re.search(r"Gloo ([\w -]+?) failed: .*Timed out waiting (\d+)ms", flat)
    if m:
        return (
            f"a collective ({m.group(1).lower()}) timed out after {int(m.group(2)) / 1000:g}s waiting for "
            f"another process ({late}; {flag})"
        )
    m = re.search(r"Gloo ([\w -]+?) failed: .*Connection closed by peer", flat)
    if m:
        return f"a collective ({m.group(1).lower()}) failed: another process left it (see its output)"
    if "Barrier timed out" in flat:
        m = re.search(r"Some timed out task names:\s*([\d ,]+?)\s*(?:RPC:|\[|$)", flat)
        if not m:  # the first line of a longer message: left as it is
            return None
        who = ", ".join(m.group(1).replace(",", " ").split())
        if where is not None:
            return f"process {who} did not reach {where} within {flag} ({late})"
        m = re.search(r"Barrier timed out\. Id: (\S+?)(?:::\d+)?\.", flat)
        return f"process {who} did not reach the barrier {m.group(1) if m else '?'} in time ({late})"
    return None


def _excepthook(previous):
    """sys.excepthook for a multi-process job: a collective or barrier that timed out ends the process
    with one line and at once (exit 1), without the shutdown barrier that would wait --distributed_timeout
    for processes that will not come; any other error goes to `previous`."""

    def hook(kind, value, tb):
        summary = str(value) if isinstance(value, CollectiveTimeout) else None
        if summary is None and isinstance(value, RuntimeError):
            summary = summarize_runtime_error(str(value), _job.collective_timeout)
        if summary is None or os.environ.get("DDLM_TRACEBACK"):
            previous(kind, value, tb)
            if summary is None:
                return
        sys.stdout.flush()
        print(f"ddlm: error: {_job.label}: {summary}", file=sys.stderr, flush=True)
        os._exit(1)

    return hook


# ------------------------------------------------------------------------------------------------ preemption


class StopRequest:
    """A stop asked for by SIGTERM (preemption notice, scancel, the launcher), acted on at a step boundary.

    Multi-process: jax.distributed's preemption notifier already handles SIGTERM (installed by initialize);
    `reached(step)` asks its sync manager, which returns True on every process at the same step. Single
    process: a Python handler sets a flag. Use as a context manager (the handler is removed on exit)."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._sync = None

    def __enter__(self):
        import jax
        from jax._src import distributed as jax_distributed

        if jax.process_count() > 1 and jax_distributed.global_state.preemption_sync_manager is not None:
            from jax.experimental import multihost_utils

            self._sync = multihost_utils.reached_preemption_sync_point
        else:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def _on_signal(self, signum, frame):
        del signum, frame
        self.signalled = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (called once per step, with increasing steps)."""
        if self._sync is not None:
            self.signalled = self._sync(step) or self.signalled
            return self.signalled
        if self.signalled:
            import jax

            if jax.process_count() > 1:  # no sync manager (jax_enable_preemption_service=False): agree here
                from jax.experimental import multihost_utils

                return bool(multihost_utils.process_allgather(1).max())
        return self.signalled


# ------------------------------------------------------------------------------------------------ failure line

# A glog line: level, date, time, thread, file:line] message.
_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w.]+):\d+\] ?(.*)$")
# The C++ files whose warnings precede the fatal line when a process of the job dies; held back briefly so
# that they can be dropped with it.
_RUNTIME_FILES = ("coordination_service", "preemption_", "client.h", "distributed")
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_HOLD_S = 2.0  # how long warnings of the runtime are held back, waiting for a fatal line


def summarize_fatal(status: str, heartbeat_timeout: int, init_timeout: int) -> str:
    """What the fatal block of jax.distributed's client says, in a few words, naming the flag that bounds
    it (status: the absl::Status text after 'absl::Status: ', possibly several lines)."""
    text = " ".join(status.split())
    beat = f"--heartbeat_timeout={heartbeat_timeout}s"
    m = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d ,]+?)\s*The tasks", text)
    if m:
        who = ", ".join(m.group(1).replace(",", " ").split())
        return f"process {who} stopped sending heartbeats (died, was killed or preempted, or hangs; {beat})"
    if "Shutdown barrier" in text:  # this process ended (an error, or done) and another did not follow
        m = re.search(r"Some timed out task names:\s*([\d ,]+?)\s*\[", text)
        who = ", ".join(m.group(1).replace(",", " ").split()) if m else "?"
        return (
            f"process {who} did not reach the end of the job within --distributed_timeout={init_timeout}s "
            "(it failed earlier or is still working: see its output)"
        )
    if "RegisterTask" in text or "barrier" in text.lower() and "DEADLINE_EXCEEDED" in text:
        return (
            f"not every process joined within --distributed_timeout={init_timeout}s (is each one started, "
            "with the same --coordinator_address and --num_processes?)"
        )
    if "leader task was preempted/died" in text or "Failed to send RPC to coordination service" in text:
        return (
            f"lost the coordinator (process 0 died, was killed or preempted, or the network failed; {beat})"
        )
    first = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return f"the job failed ({first[:200]})"


class FailureFilter:
    """Turns the fatal block of jax.distributed (held-back runtime warnings, the 'F... Terminating process'
    line with its status, the stack dump) into one `ddlm: error:` line; rewrites a `ddlm: error:` line
    that carries a timed-out collective's raw error (ddlm.main's line for an error it catches) into the
    words of summarize_runtime_error; passes every other line on."""

    def __init__(
        self,
        label: str,
        heartbeat_timeout: int,
        init_timeout: int = 300,
        collective_timeout: int = COLLECTIVE_TIMEOUT_S,
    ):
        self.label = label  # 'process 0 of 2'
        self.heartbeat_timeout = heartbeat_timeout
        self.init_timeout = init_timeout
        self.collective_timeout = collective_timeout
        self.held: list[str] = []
        self.held_since = 0.0
        self.fatal: list[str] | None = None  # the status lines once the fatal line was seen
        self.done = False

    def feed(self, line: str, now: float | None = None) -> list[str]:
        """Lines to write now for the input `line` (with its newline)."""
        now = time.monotonic() if now is None else now
        if self.done:  # after the one line: the stack dump and anything the dying process adds
            return [self._explained(line)] if line.startswith("ddlm:") else []
        if self.fatal is not None:
            if line.startswith(("*** Check failure", "    @ ")):
                return self._finish()
            self.fatal.append(line)
            return []
        m = _GLOG.match(line)
        if m and m.group(1) == "F" and _FATAL in m.group(3):
            self.held = []
            status = m.group(3).split("absl::Status:", 1)
            self.fatal = [status[1] if len(status) > 1 else ""]
            return []
        if m and m.group(1) in "WE" and any(f in m.group(2) for f in _RUNTIME_FILES):
            if not self.held:
                self.held_since = now
            self.held.append(line)
            return []
        if self.held and not m and not line.startswith("ddlm:"):  # a continuation of a held message
            self.held.append(line)
            return []
        return self.release(now, force=True) + [self._explained(line)]

    def _explained(self, line: str) -> str:
        summary = line.startswith("ddlm: error: ") and summarize_runtime_error(line, self.collective_timeout)
        return f"ddlm: error: {self.label}: {summary}\n" if summary else line

    def release(self, now: float, force: bool = False) -> list[str]:
        """Held lines, once they have waited _HOLD_S without a fatal line following (or at once: force)."""
        if self.held and (force or now - self.held_since >= _HOLD_S):
            out, self.held = self.held, []
            return out
        return []

    def close(self) -> list[str]:
        """At the end of the input: a fatal block cut short still makes its line."""
        if self.fatal is not None and not self.done:
            return self._finish()
        return self.release(0.0, force=True)

    def _finish(self) -> list[str]:
        self.done = True
        summary = summarize_fatal("".join(self.fatal or []), self.heartbeat_timeout, self.init_timeout)
        line = f"ddlm: error: {self.label}: {summary}; jax.distributed ended this process\n"
        return [line]


def _label(plan: Plan) -> str:
    """'process 1 of 2' (the rank from the flags or the cluster's variables) for this process's lines."""
    if plan.process_id is not None:
        return f"process {plan.process_id} of {plan.num_processes}"
    rank = next((os.environ[v] for v in ("SLURM_PROCID", "TPU_WORKER_ID") if v in os.environ), "?")
    return f"process {rank}"


def guard_stderr(
    plan: Plan,
    heartbeat_timeout: int,
    init_timeout: int = 300,
    collective_timeout: int = COLLECTIVE_TIMEOUT_S,
) -> None:
    """Routes this process's stderr (fd 2, C++ included) through this file run as a script (a
    FailureFilter writing to the real stderr). The filter ignores SIGTERM/SIGINT (a preemption signal
    sent to every process of the job must not cut this process's stderr) and ends at end of input."""
    label = _label(plan)
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    real_stderr = os.dup(2)
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), label]
        + [str(t) for t in (heartbeat_timeout, init_timeout, collective_timeout)],
        stdin=read_end,
        stdout=real_stderr,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # a Ctrl-C or a signal to the process group reaches the job, not the filter
    )
    os.close(read_end)
    os.close(real_stderr)
    os.dup2(write_end, 2)
    os.close(write_end)


def _filter_main(label: str, heartbeat_timeout: str, init_timeout: str, collective_timeout: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    filt = FailureFilter(label, int(heartbeat_timeout), int(init_timeout), int(collective_timeout))
    out = sys.stdout.buffer
    fd = sys.stdin.fileno()
    pending = b""

    def write(lines):
        for line in lines:
            out.write(line.encode(errors="replace"))
        out.flush()

    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            write(filt.release(time.monotonic()))
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            write(filt.feed(raw.decode(errors="replace") + "\n"))
        # A partial line (a progress bar's \r update) goes out at once unless something is held back.
        if pending and not filt.held and filt.fatal is None and not re.match(rb"[IWEF]\d", pending):
            out.write(pending)
            out.flush()
            pending = b""
    if pending:
        write(filt.feed(pending.decode(errors="replace")))
    write(filt.close())


if __name__ == "__main__":
    _filter_main(*sys.argv[1:5])  # stdlib only: this file runs as a script, without the ddlm package
