"""Several JAX processes on this machine, joined with jax.distributed over localhost (a cluster rehearsal).

    python launch/multiprocess.py --num_processes=2 --devices_per_process=4 -- \
        --config=experiments/quickstart.py --workdir=runs/mp --config.mesh.fsdp=2

Each process gets `--devices_per_process` fake CPU devices (XLA_FLAGS) unless --gpus is given, in which
case process i sees GPU i only (CUDA_VISIBLE_DEVICES). Everything after `--` goes to ddlm.main. The
processes' output is prefixed with [i]; the launcher exits with the first non-zero exit code.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pump(i, stream):
    for line in stream:
        sys.stdout.write(f"[{i}] {line}")
        sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4, help="fake CPU devices per process")
    parser.add_argument("--gpus", action="store_true", help="one GPU per process instead of fake CPU devices")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then the ddlm.main flags")
    args = parser.parse_args()
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    address = f"localhost:{args.port or free_port()}"

    procs, threads = [], []
    for i in range(args.num_processes):
        env = dict(os.environ)
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
        ]
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        t = threading.Thread(target=pump, args=(i, p.stdout), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    sys.exit(next((c for c in codes if c), 0))


if __name__ == "__main__":
    main()
