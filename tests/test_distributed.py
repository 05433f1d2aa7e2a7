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
import pytest
from test_main import QUICKSTART, REPO, TINY_OVERRIDES

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
        DDLM_KILL_AFTER_CHECKPOINT_STEP="2@1",  # every process waits for checkpoint 2; process 1 dies
    )
    started = []
    try:
        # 1. The pair, process 1 killed after checkpoint 2.
        address = f"localhost:{free_port()}"
        pair = []
        for i in range(2):
            cmd = [sys.executable, "-m", "ddlm.main", f"--config={QUICKSTART}", f"--workdir={work}", *ARGS]
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
            pair[i].wait(timeout=JOB_TIMEOUT_S)
            exits[i] = time.monotonic()

        waiters = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(2)]
        for t in waiters:
            t.start()

        # 2. Meanwhile the reference: one process, 8 devices, a checkpoint at every step.
        from ddlm.train import trainer

        config = quickstart_config([*ARGS, "--config.train.ckpt_every=1"])
        trainer.train_and_evaluate(config, ref)

        for t in waiters:
            t.join(timeout=JOB_TIMEOUT_S)
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
        env.pop("DDLM_KILL_AFTER_CHECKPOINT_STEP")
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
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not re.search(rf"\[0\].*step 4/{STEPS} \| loss", out.text()):
            assert launcher.poll() is None and time.monotonic() < deadline, out.text()[-3000:]
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=240)
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
    assert killed["seconds_after_death"] < HEARTBEAT_S + 5, killed["seconds_after_death"]
    errors = [line for line in killed["stderr"].splitlines() if "error" in line.lower() or "fatal" in line.lower()]
    assert errors == [
        f"ddlm: error: process 0 of 2: process 1 stopped sending heartbeats (died, was killed or preempted, "
        f"or hangs); jax.distributed ended this process (--heartbeat_timeout={HEARTBEAT_S}s)"
    ], killed["stderr"][-3000:]
    assert "Check failure" not in killed["stderr"] and "Traceback" not in killed["stderr"]
    assert killed["checkpoints"] == ["2"]  # the pair got as far as the kill


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_relaunch_resumes_and_sigterm_checkpoints_the_current_step_and_exits_cleanly(job):
    log, code = job["relaunch"]["log"], job["relaunch"]["code"]
    assert code == 0, log[-3000:]
    # Each process says once who and where it is; only process 0 logs the training.
    for i, devices in ((0, "0-3"), (1, "2048-2051")):
        joined = re.findall(rf"^\[{i}\] ddlm: process {i} of 2 joined jax.distributed \((.*)\)$", log, re.M)
        assert len(joined) == 1 and f"4 local cpu devices [{devices}] of 8, found by flags" in joined[0], log
    assert "[0] I" in log and not re.search(r"^\[1\] I", log, re.M)
    assert f"Restored checkpoint from step 2 (of {STEPS})" in log
    assert f"step 3/{STEPS} | loss" in log and f"step 2/{STEPS} | loss" not in log
    stops = re.findall(r"^\[(\d)\] W.*Stop requested \(SIGTERM\): saved the checkpoint of step (\d+)", log, re.M)
    assert sorted(p for p, _ in stops) == ["0", "1"] and stops[0][1] == stops[1][1], log[-3000:]
    stop = int(stops[0][1])
    assert 4 < stop < STEPS
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
