"""ddlm/workdir_lock.py: a second training job on a workdir that a live job holds is refused with one line
(every process of it), before it reads or writes anything; the lock goes with its holder however it
dies. (A killed multi-process launcher freeing its workdir: tests/test_launch.py.)"""

import hashlib
import os
import signal
import socket
import subprocess
import sys

import deadlines
import pytest
from test_distributed import free_port
from test_main import QUICKSTART, REPO, TINY_OVERRIDES

from ddlm import workdir_lock

# A stand-in for a training job: holds the lock through the trainer's own call, says so, then waits.
HOLDER = (
    "import sys, time; from ddlm import workdir_lock\n"
    "with workdir_lock.hold(sys.argv[1]):\n"
    "    print('held', flush=True); time.sleep(300)"
)


def snapshot(root) -> dict[str, tuple[int, str]]:
    """Every file under `root`: its modification time and a hash of its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            files[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, digest)
    return files


@pytest.mark.timeout(300)
def test_a_second_job_is_refused_in_one_line_touching_nothing_and_the_lock_dies_with_its_holder(tmp_path):
    work = tmp_path / "run"
    (work / "checkpoints" / "2").mkdir(parents=True)
    (work / "checkpoints" / "2" / "marker").write_text("a checkpoint of the live job")
    (work / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 5.0}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        held_by = workdir_lock.holder(work)
        assert held_by.startswith(f"pid {holder.pid} on host {socket.gethostname()}, since ")
        before = snapshot(work)

        # A two-process job on it: process 0 is refused the lock and tells process 1 (the key-value store).
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        address = f"localhost:{free_port()}"
        cmd = [sys.executable, "-m", "ddlm.main", f"--config={QUICKSTART}", f"--workdir={work}"]
        cmd += [*TINY_OVERRIDES, "--config.train.steps=2", f"--coordinator_address={address}"]
        cmd += ["--num_processes=2"]
        job = [
            subprocess.Popen(
                [*cmd, f"--process_id={i}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in range(2)
        ]
        results = [(p.communicate(timeout=deadlines.scaled(240)), p.returncode) for p in job]
        line = (
            f"ddlm: error: WorkdirInUse: --workdir {work} is in use by another training job ({held_by}): "
            "wait for it to end or stop it, or train in another --workdir"
        )
        for i, ((_, err), code) in enumerate(results):
            err = err.decode()
            assert code == 1, (i, err[-3000:])
            assert [e for e in err.splitlines() if "error" in e.lower()] == [line], (i, err[-3000:])
            assert "Traceback" not in err
        assert snapshot(work) == before

        # kill -9 of the holder: the lock is free (no stale pid file to clear), and taken at once.
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert workdir_lock.holder(work) is None
        with workdir_lock.hold(work):
            assert workdir_lock.holder(work).startswith(f"pid {os.getpid()} on host ")
        assert workdir_lock.holder(work) is None
        assert not (work / workdir_lock.LOCK_FILE).exists()  # a job that ends normally leaves no lock file
    finally:
        holder.kill()
        holder.wait()
