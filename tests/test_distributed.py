"""Multi-process jobs (ddlm/distributed.py, launch/): 2 processes x 4 fake CPU devices against 1 process x 8.

One job, tiny quickstart (1 layer, d_model 32, 8 x 16 tokens, constant learning rate), run once for the module:

  1. two processes started directly; process 1 SIGKILLs itself right after checkpoint 2 (test hook): process
     0, stuck in the next step's all-reduce, must exit non-zero with one line within HEARTBEAT_S + 5 s;
  2. meanwhile, the same config trains in this pytest process (1 process, 8 devices) to STEPS, with a
     checkpoint at every step: the reference;
  3. launch/multiprocess.py relaunches the pair on the same workdir (it resumes from checkpoint 2); once
     step 4 is logged, the launcher gets SIGTERM and passes it on: both processes save a checkpoint at the
     same step S and exit 0;
  4. tests compare the pair's losses (steps 1..S) and state at S with the reference, and continue the pair's
     checkpoint in this process on another mesh (4 devices, fsdp=2 x tensor=2).

Plus, without processes: cluster detection, the failure-line filter, and every launcher's dry run (whose
ddlm.main flags are parsed by ddlm.main's own parser, so a typo in a script fails here).
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import deadlines
import pytest
from test_main import KILLABLE_MAIN, QUICKSTART, REPO, TINY_OVERRIDES

from ddlm import distributed

HEARTBEAT_S = 10  # --heartbeat_timeout of the pair; a dead process must end the other within this + 5 s
STEPS = 14
# 2 x 4 devices against 1 x 8: the same program, but the cross-process all-reduce (gloo) may add the
# per-device partial sums in another order than the in-process one.
RTOL, ATOL = 1e-5, 1e-6
ARGS = [
    *TINY_OVERRIDES,
    "--config.optim.decay=constant",  # the learning rate does not depend on train.steps
    "--config.data.shard_by_process=False",  # the batches do not depend on the process count
    f"--config.train.steps={STEPS}",
    "--config.train.ckpt_every=2",
    f"--config.train.keep_checkpoints={STEPS}",
]
JOB_TIMEOUT_S = 540  # the module's job, on the shared 2-core machine under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def quickstart_config(flags):
    """experiments/quickstart.py's config with --config.x=y `flags` applied."""
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for flag in flags:
        key, value = flag[len("--config.") :].split("=", 1)
        old = config
        for part in key.split("."):
            old = old[part]
        value = (value == "True") if isinstance(old, bool) else type(old)(value)
        config.update_from_flattened_dict({key: value})
    return config


def read_state(step_dir):
    """The saved TrainState as numpy arrays (whatever devices wrote it)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    path = os.path.join(step_dir, "state")
    tree = checkpointer.metadata(path)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=as_numpy)


def losses(workdir) -> dict[int, float]:
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


class Output:
    """Collects a process's output lines in a thread (a full pipe would block the process)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream):
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


# ------------------------------------------------------------------------------------------------ the job


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    work, ref = str(root / "pair"), str(root / "reference")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),  # the relaunch compiles the same programs
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    started = []
    try:
        # 1. The pair, process 1 killed after checkpoint 2.
        address = f"localhost:{free_port()}"
        pair = []
        for i in range(2):
            # tests/killable_main.py: every process waits for checkpoint 2; process 1 dies.
            cmd = [sys.executable, *KILLABLE_MAIN, "--kill_after_checkpoint=2@1", f"--config={QUICKSTART}"]
            cmd += [f"--workdir={work}", *ARGS]
            cmd += [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
            cmd += [f"--heartbeat_timeout={HEARTBEAT_S}", "--distributed_timeout=120"]
            p = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            p.out, p.err = Output(p.stdout), Output(p.stderr)
            pair.append(p)
        started += pair
        exits = {}

        def wait(i):
            pair[i].wait(timeout=deadlines.scaled(JOB_TIMEOUT_S))
            exits[i] = time.monotonic()

        waiters = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(2)]
        for t in waiters:
            t.start()

        # 2. Meanwhile the reference: one process, 8 devices, a checkpoint at every step.
        from ddlm.train import trainer

        config = quickstart_config([*ARGS, "--config.train.ckpt_every=1"])
        trainer.train_and_evaluate(config, "file://" + ref)  # a URI workdir: the ddlm.paths route

        for t in waiters:
            t.join(timeout=deadlines.scaled(JOB_TIMEOUT_S))
        for p in pair:
            p.out.thread.join(timeout=10)
            p.err.thread.join(timeout=10)
        killed = {
            "codes": [p.returncode for p in pair],
            "seconds_after_death": exits[0] - exits[1],
            "stderr": pair[0].err.text(),
            "checkpoints": sorted(os.listdir(os.path.join(work, "checkpoints"))),
        }

        # 3. The relaunch through the launcher, SIGTERM once step 4 is logged.
        launcher = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "launch", "multiprocess.py"), "--num_processes=2"]
            + ["--devices_per_process=4", "--start_timeout=120", "--stop_grace=120", "--"]
            + [f"--config={QUICKSTART}", f"--workdir={work}", *ARGS, f"--heartbeat_timeout={HEARTBEAT_S}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(launcher)
        out = Output(launcher.stdout)
        deadline = time.monotonic() + deadlines.scaled(JOB_TIMEOUT_S)
        while not re.search(rf"\[0\].*step 4/{STEPS} \| loss", out.text()):
            assert launcher.poll() is None and time.monotonic() < deadline, out.text()[-3000:]
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=deadlines.scaled(240))
        out.thread.join(timeout=10)
        yield {
            "work": work,
            "reference": ref,
            "config": config,
            "killed": killed,
            "relaunch": {"code": launcher.returncode, "log": out.text()},
        }
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_a_dead_process_ends_the_other_with_one_line_within_the_heartbeat_bound(job):
    killed = job["killed"]
    assert killed["codes"][1] == -signal.SIGKILL, killed
    assert killed["codes"][0] not in (0, None), killed
    assert killed["seconds_after_death"] < HEARTBEAT_S + deadlines.scaled(5), killed["seconds_after_death"]
    errors = [
        line for line in killed["stderr"].splitlines() if "error" in line.lower() or "fatal" in line.lower()
    ]
    assert errors == [
        f"ddlm: error: process 0 of 2: process 1 stopped sending heartbeats (died, was killed or preempted, "
        f"or hangs; --heartbeat_timeout={HEARTBEAT_S}s); jax.distributed ended this process"
    ], killed["stderr"][-3000:]
    assert "Check failure" not in killed["stderr"] and "Traceback" not in killed["stderr"]
    assert killed["checkpoints"] == ["2"]  # the pair got as far as the kill


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_relaunch_resumes_and_sigterm_checkpoints_the_current_step_and_exits_cleanly(job):
    log, code = job["relaunch"]["log"], job["relaunch"]["code"]
    assert code == 0, log[-3000:]
    # Each process says once who and where it is; only process 0 logs the training.
    for i, devices in ((0, "0-3"), (1, "2048-2051")):
        joined = re.findall(
            rf"^\[{i}\] ddlm: process {i} of 2 joined jax.distributed \((.*)\)$", log, re.MULTILINE
        )
        assert len(joined) == 1 and f"4 local cpu devices [{devices}] of 8, found by flags" in joined[0], log
    assert "[0] I" in log and not re.search(r"^\[1\] I", log, re.MULTILINE)
    assert f"Restored checkpoint from step 2 (of {STEPS})" in log
    assert f"step 3/{STEPS} | loss" in log and f"step 2/{STEPS} | loss" not in log
    stops = re.findall(
        r"^\[(\d)\] W.*Stop requested \(SIGTERM\): saved the checkpoint of step (\d+)", log, re.MULTILINE
    )
    assert sorted(p for p, _ in stops) == ["0", "1"] and stops[0][1] == stops[1][1], log[-3000:]
    stop = int(stops[0][1])
    # SIGTERM went out once step 4 was logged: the processes agree on step 4 if the notice reached them
    # before their step-4 boundary (the checkpoint of step 4 is saved in between), else on a later step.
    assert 4 <= stop < STEPS
    last_logged = max(int(s) for s in re.findall(rf"step (\d+)/{STEPS} \| loss", log))
    assert last_logged == stop  # the checkpoint is of the step it stopped at: nothing ran past it
    checkpoints = sorted(int(s) for s in os.listdir(os.path.join(job["work"], "checkpoints")))
    assert checkpoints[-1] == stop and 4 in checkpoints
    assert "launch/multiprocess.py: stopped by signal 15: process exit codes [0, 0]" in log


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_two_processes_end_with_the_loss_and_parameters_of_one_process(job):
    work, ref = job["work"], job["reference"]
    stop = max(int(s) for s in os.listdir(os.path.join(work, "checkpoints")))
    pair_losses, ref_losses = losses(work), losses(ref)
    assert sorted(pair_losses) == list(range(1, stop + 1))  # each step once, across the kill and resume
    np.testing.assert_allclose(
        [pair_losses[s] for s in range(1, stop + 1)], [ref_losses[s] for s in range(1, stop + 1)], RTOL, ATOL
    )
    pair_state = read_state(os.path.join(work, "checkpoints", str(stop)))
    ref_state = read_state(os.path.join(ref, "checkpoints", str(stop)))
    for name in ("params", "ema_params", "opt_state", "step", "rng"):
        for x, y in zip(jax.tree.leaves(pair_state[name]), jax.tree.leaves(ref_state[name]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), RTOL, ATOL, err_msg=name)


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_two_process_checkpoint_continues_in_one_process_on_another_mesh(job, tmp_path, caplog):
    from ddlm.train import trainer

    work = str(tmp_path / "continued")
    shutil.copytree(job["work"], work)
    stop = max(int(s) for s in os.listdir(os.path.join(work, "checkpoints")))
    config = job["config"].copy_and_resolve_references()
    config.train.steps = stop + 1
    config.mesh.update({"data": 1, "fsdp": 2, "tensor": 2})
    with caplog.at_level("INFO"):
        trainer.train_and_evaluate(config, work, devices=jax.devices()[:4])
    assert f"Restored checkpoint from step {stop}" in caplog.text
    assert "data iterator starts afresh" not in caplog.text
    # The data position of the 2-process job carried over (one global stream): step stop+1 sees the
    # reference's batch and ends where the reference's step stop+1 did.
    np.testing.assert_allclose(losses(work)[stop + 1], losses(job["reference"])[stop + 1], RTOL, ATOL)
    state = read_state(os.path.join(work, "checkpoints", str(stop + 1)))
    ref_state = read_state(os.path.join(job["reference"], "checkpoints", str(stop + 1)))
    assert int(state["step"]) == stop + 1
    for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"]), strict=True):
        np.testing.assert_allclose(x, y, RTOL, ATOL)


# ------------------------------------------------------------------------------------------------ detection


def test_detect_reads_flags_slurm_and_tpu_and_stays_single_otherwise():
    env = {}
    assert distributed.detect(env) is None
    assert distributed.detect(env, force=True) == distributed.Plan("forced")
    flags = dict(coordinator_address="h:1234", num_processes=2, process_id=1)
    assert distributed.detect(env, **flags) == distributed.Plan("flags", "h:1234", 2, 1)
    assert distributed.detect(env, coordinator_address="h:1", num_processes=1, process_id=0) is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert distributed.detect({**slurm, "SLURM_NTASKS": "2"}) == distributed.Plan("slurm")
    # A batch script outside srun (one task in the step) or a one-task job: a single process.
    assert distributed.detect({**slurm, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.detect({**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.detect({**slurm, "SLURM_NTASKS": "2"}, force=False) is None
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == distributed.Plan("tpu")
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0"}) is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(num_processes=2, process_id=0),
            "--num_processes, --process_id given without --coordinator_address",
        ),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 must lie in [0, "),
        (dict(coordinator_address="h", num_processes=2, process_id=0), "must be host:port"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=0, force=False), "--nodistributed"),
    ],
)
def test_bad_distributed_flags_are_one_line(flags, message):
    with pytest.raises(distributed.DistributedConfigError, match=re.escape(message)):
        distributed.detect({}, **flags)


def test_stop_request_catches_sigterm_on_one_process_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.StopRequest() as stop:
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process is not killed: the handler only sets a flag
        assert stop.reached(2) and stop.reached(3)
    assert signal.getsignal(signal.SIGTERM) is previous


# What jaxlib 0.10.2 prints when the job loses a process (recorded from the runs above, times shortened).
HEARTBEAT_BLOCK = """\
E1130 21:47:45.374571   24002 coordination_service.cc:1549] [1269] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1130 21:47:45.375019   24013 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1130 21:47:45.375163   24013 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
    @     0x7f1921840634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7f1928ca71f5  (unknown)
"""
COORDINATOR_BLOCK = """\
W1130 21:50:07.467094   24987 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:
E1130 21:50:07.467175   24987 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1130 21:50:07.467182   24987 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
*** Check failure stack trace: ***
    @     0x7f1e0e10cd5b  std::_Function_handler<>::_M_invoke()
"""


JOIN_BLOCK = """\
F1130 23:01:02.000001   1001 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded
RPC: /xla.coordination.CoordinationService/RegisterTask
*** Check failure stack trace: ***
"""


# What jaxlib 0.10.2 prints when a process ends (here after an error) and another one never reaches the
# shutdown barrier (recorded: process 1 slower than Gloo's connection deadline at the first collective).
SHUTDOWN_BLOCK = """\
E1206 22:45:14.786996    8941 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1206 22:45:14.787168    8941 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: INTERNAL: Shutdown barrier has failed.
Barrier result: 'DEADLINE_EXCEEDED: Barrier timed out. Id: Shutdown::14583502393719643639::0. This usually happens because a task triggered the barrier too early or too slowly. Please look at the task logs (both timed out and first task) to debug further.
# of tasks that reached the barrier: 1/2.
The first task at the barrier: 0. Some timed out task names:
1
 [type.googleapis.com/tensorflow.CoordinationServiceError=''] [type.googleapis.com/tensorflow.BarrierError='\\n\\x1eShutdown::14583502393719643639']

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
    @     0x7fec7fe40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""


def filtered(text: str, now: float = 0.0) -> list[str]:
    f = distributed.FailureFilter("process 0 of 2", heartbeat_timeout=10, collective_timeout=5)
    out = []
    for line in text.splitlines(keepends=True):
        out += f.feed(line, now)
    return out + f.close()


@pytest.mark.parametrize(
    "block, summary",
    [
        (
            HEARTBEAT_BLOCK,
            "process 1 stopped sending heartbeats (died, was killed or preempted, or hangs; "
            "--heartbeat_timeout=10s)",
        ),
        (
            COORDINATOR_BLOCK,
            "lost the coordinator (process 0 died, was killed or preempted, or the network failed; "
            "--heartbeat_timeout=10s)",
        ),
        (
            JOIN_BLOCK,
            "not every process joined within --distributed_timeout=300s (is each one started, with the same "
            "--coordinator_address and --num_processes?)",
        ),
        (
            SHUTDOWN_BLOCK,  # was reported as 'not every process joined'
            "process 1 did not reach the end of the job within --distributed_timeout=300s (it failed earlier "
            "or is still working: see its output)",
        ),
    ],
)
def test_failure_filter_turns_the_fatal_block_into_one_line(block, summary):
    before = "I1130 21:47:40.1 1 trainer.py:549] step 2/6 | loss 5.1\n"
    assert filtered(before + block) == [
        before,
        f"ddlm: error: process 0 of 2: {summary}; jax.distributed ended this process\n",
    ]


def test_guarded_stderr_of_an_aborting_process_is_one_line():
    """The filter process end to end: a process that writes jaxlib's fatal block to fd 2 (as the C++
    client does) and aborts leaves one line on its stderr; its ordinary lines pass on."""
    code = (
        "import os, sys; from ddlm import distributed; "
        "distributed.guard_stderr(distributed.Plan('flags', 'h:1', 2, 0), 10); "
        "print('ordinary line', file=sys.stderr, flush=True); "
        f"os.write(2, {HEARTBEAT_BLOCK.encode()!r}); os.abort()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGABRT
    assert proc.stderr.splitlines() == [
        "ordinary line",
        "ddlm: error: process 0 of 2: process 1 stopped sending heartbeats (died, was killed or preempted, "
        "or hangs; --heartbeat_timeout=10s); jax.distributed ended this process",
    ], proc.stderr


def test_failure_filter_passes_other_lines_and_releases_held_warnings():
    warning = "W1130 22:14:20.583115    8418 preemption_notifier.cc:90] SIGTERM caught at 2026-11-30\n"
    lines = ["plain\n", "E1130 22:00:00.1 1 other.cc:1] not the runtime\n", warning, "next\n"]
    assert filtered("".join(lines)) == lines  # a held warning goes out with the next line
    f = distributed.FailureFilter("process 0 of 2", heartbeat_timeout=10)
    assert f.feed(warning, now=100.0) == []
    assert f.release(now=101.0) == [] and f.release(now=100.0 + distributed._HOLD_S) == [warning]


# The errors jaxlib 0.10.2 raises in Python when the other process of a pair is late for a collective or a
# barrier, or leaves one (recorded on 2 processes x 2 CPU devices: process 1 slept before the collective).
LATE = "slower: still compiling, overloaded or stuck, or dead; see its output"
COLLECTIVE_ERRORS = [
    (  # the first collective of a program: Gloo's connection set-up, a fixed 30 s (process 1 was 40 s late)
        "UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out with key: "
        "cpu:gloo/0,1,2048,2049/2 and duration: 29.99999995s "
        "[type.googleapis.com/tensorflow.CoordinationServiceError='']",
        "a collective timed out: Gloo's connection set-up (at a program's first collective) gave up after 30s "
        f"waiting for another process ({LATE}); jaxlib fixes this deadline, unlike --collective_timeout=5s",
    ),
    (  # a later all-reduce, with --xla_cpu_collective_timeout_seconds=5 (--collective_timeout=5)
        "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
        "waiting 5000ms for recv operation to complete",
        f"a collective (all-reduce) timed out after 5s waiting for another process ({LATE}; "
        "--collective_timeout=5s)",
    ),
    (  # the other side of it: the process that timed out has left the all-reduce
        "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by "
        "peer [127.0.0.1]:35539",
        "a collective (all-reduce) failed: another process left it (see its output)",
    ),
    (  # a barrier of the coordination service (wait_for_all's, 3 s), process 1 late
        "DEADLINE_EXCEEDED: Barrier timed out. Id: ddlm_1_the_first_train_step::0. This usually happens because "
        "a task triggered the barrier too early or too slowly. Please look at the task logs (both timed out "
        "and first task) to debug further.\n# of tasks that reached the barrier: 1/2.\nThe first task at the "
        "barrier: 0. Some timed out task names:\n1\n\n\nRPC: /xla.coordination.CoordinationService/Barrier "
        "[type.googleapis.com/tensorflow.CoordinationServiceError='']",
        f"process 1 did not reach the barrier ddlm_1_the_first_train_step in time ({LATE})",
    ),
]


@pytest.mark.parametrize("error, summary", COLLECTIVE_ERRORS, ids=["connect", "all-reduce", "left", "barrier"])
def test_a_timed_out_collective_is_named_with_its_deadline(error, summary):
    assert distributed.summarize_runtime_error(error, collective_timeout=5) == summary
    # ddlm.main's line for an error it catches (jax raises some as ValueError) becomes the process's line;
    # the first line of a longer message (a barrier's) is left as it is.
    line = f"ddlm: error: ValueError: {error}\n"
    expected = [f"ddlm: error: process 0 of 2: {summary}\n"] if "\n" not in error else line.splitlines(True)
    assert filtered(line) == expected


def test_other_errors_are_not_taken_for_collective_timeouts():
    assert distributed.summarize_runtime_error("RESOURCE_EXHAUSTED: Out of memory allocating 320GB", 5) is None
    line = "ddlm: error: ValueError: config.model.d_model must be an integer >= 1, got 0\n"
    assert filtered(line) == [line]


def test_wait_for_all_names_the_place_and_the_flag():
    error = COLLECTIVE_ERRORS[-1][0]
    assert distributed.summarize_runtime_error(error, 3, where="the first train step") == (
        f"process 1 did not reach the first train step within --collective_timeout=3s ({LATE})"
    )


def test_collective_timeout_becomes_xla_cpu_collective_timeout_seconds():
    flags = "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=9"
    assert distributed.with_collective_timeout(flags, 60) == (
        "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=60"
    )
    assert distributed.with_collective_timeout("", 7) == "--xla_cpu_collective_timeout_seconds=7"
    with pytest.raises(distributed.DistributedConfigError, match=r"--collective_timeout must be an integer"):
        distributed.start(distributed.Plan("flags", "h:1", 2, 0), collective_timeout=0)


def test_a_process_whose_collective_timed_out_ends_with_one_line_at_once():
    """start()'s excepthook: the error a collective raised is one line and exit 1, without a traceback and
    without the shutdown barrier (which would wait --distributed_timeout for a process that is not coming)."""
    code = (
        "import atexit, sys; from ddlm import distributed; "
        "atexit.register(lambda: print('atexit ran', file=sys.stderr)); "
        "distributed._job.label, distributed._job.collective_timeout = 'process 0 of 2', 5; "
        "sys.excepthook = distributed._excepthook(sys.excepthook); "
        f"raise RuntimeError({COLLECTIVE_ERRORS[0][0]!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"ddlm: error: process 0 of 2: {COLLECTIVE_ERRORS[0][1]}"], proc.stderr


def dry_run(cmd, env=None) -> str:
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def main_args(command: list[str]) -> list[str]:
    """The ddlm.main flags of a `python -m ddlm.main ...` command line."""
    i = command.index("ddlm.main")
    return command[i + 1 :]


@pytest.mark.timeout(120)
def test_launchers_dry_run_print_commands_whose_flags_ddlm_main_accepts(tmp_path):
    overrides = ["--config.train.steps=3", "--config.mesh.fsdp=2"]
    local = shlex.split(
        dry_run(["bash", "launch/local.sh", "--dry-run", QUICKSTART, str(tmp_path), *overrides])
    )
    slurm_env = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "HEARTBEAT_TIMEOUT": "20"}
    slurm_out = dry_run(
        ["bash", "launch/slurm.sbatch", "--dry-run", QUICKSTART, str(tmp_path), *overrides], slurm_env
    )
    assert slurm_out.startswith("# job 77: 2 node(s), 2 task(s)\n")
    slurm = shlex.split(slurm_out.splitlines()[1])
    assert slurm[:3] == ["srun", "--kill-on-bad-exit=1", "--unbuffered"] and "--heartbeat_timeout=20" in slurm
    tpu_out = dry_run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "--create", "v4-32", "my-tpu", "us-central2-b"]
        + ["experiments/quickstart.py", "gs://bucket/run", *overrides, "--config.data.corpus=local:/a b"]
    ).splitlines()
    assert len(tpu_out) == 2 and "describe my-tpu" in tpu_out[0] and "|| gcloud" in tpu_out[0]
    assert "create my-tpu --zone=us-central2-b --accelerator-type=v4-32" in tpu_out[0]
    ssh = shlex.split(tpu_out[1])
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    remote = shlex.split(ssh[-1][len("--command=") :])
    assert remote[:3] == ["cd", "~/ddlm", "&&"] and "--distributed" in remote
    assert remote[-1] == "--config.data.corpus=local:/a b"  # quoting survives the remote shell
    mp = [
        shlex.split(line)
        for line in dry_run(
            [
                sys.executable,
                "launch/multiprocess.py",
                "--dry_run",
                "--",
                f"--config={QUICKSTART}",
                f"--workdir={tmp_path}",
                *overrides,
                "--collective_timeout=60",
            ]
        ).splitlines()
    ]
    assert [c[0] for c in mp] == ["JAX_PLATFORMS=cpu"] * 2 and "--process_id=1" in mp[1]
    # A gs:// workdir is required on a pod; and every printed ddlm.main command parses (config loaded,
    # overrides applied), so a typo'd flag in a launcher fails here.
    bad = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "t", "z", QUICKSTART, "/local"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "must be a gs:// path" in bad.stderr
    commands = [main_args(local), main_args(slurm), main_args(remote), main_args(mp[0][2:])]
    commands.append([*main_args(local), "--config.train.stepz=3"])  # a typo: must fail
    # Each in its own interpreter, with sys.argv set (absl parses once per process; ml_collections reads
    # the overrides from sys.argv).
    check = (
        "import sys, json; sys.argv = ['ddlm', *json.loads(sys.argv[1])]; "
        "from ddlm import command, main; command.parse_flags(sys.argv, config=main._CONFIG)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", check, json.dumps(args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = [(p.wait(timeout=deadlines.scaled(60)), p.communicate()[1]) for p in procs]
    for args, (code, err) in zip(commands[:-1], results[:-1], strict=True):
        assert code == 0, (args, err[-2000:])
    code, err = results[-1]
    assert code == 2 and "ddlm: error: bad config override --config.train.stepz" in err, err
