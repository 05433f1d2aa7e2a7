"""Interleaved A/B of process-wide settings (environment variables: XLA_FLAGS, DDLM_HOST_MALLOC, ...) on the
train step: each side runs in fresh processes, alternating A B B A A B ..., since such settings are read
once at start-up and cannot differ inside one process (benchmarks/step_ab.py compares code or configs in one).

    python benchmarks/process_ab.py --b_env=DDLM_HOST_MALLOC=0                      # host malloc on vs off
    python benchmarks/process_ab.py --b_env=XLA_FLAGS=--xla_cpu_use_onednn=true --rounds=4

Each process builds the step of benchmarks/step_ab.py (the peers' shape by default), runs --steps steps after
one warm-up, and reports the median wall-clock and process-CPU time per step and the minor page faults and
kernel time per step. Printed: per round, A/B ratios (> 1: B faster); at the end their median and spread.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(argv):
    sys.path.insert(0, HERE)
    import jax

    import step_ab

    args = step_ab.parse_args(argv)
    compiled, state, get_batch, _, compile_s, _ = step_ab.load_step(args.b, args.b_set, args)
    wall, cpu = [], []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, get_batch(i))
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = args.steps
    print(
        "RESULT "
        + json.dumps(
            {
                "wall": statistics.median(wall),
                "cpu": statistics.median(cpu),
                "faults": (r1.ru_minflt - r0.ru_minflt) / n,
                "sys": (r1.ru_stime - r0.ru_stime) / n,
                "compile": compile_s,
            }
        )
    )


def _env(assignments):
    env = dict(os.environ)
    for a in assignments:
        key, _, value = a.partition("=")
        env[key] = value
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a_env", action="append", default=[], help="KEY=VALUE for side A's processes")
    p.add_argument("--b_env", action="append", default=[], help="KEY=VALUE for side B's processes")
    p.add_argument("--rounds", type=int, default=3)
    args, step_args = p.parse_known_args()
    results = {"A": [], "B": []}
    for r in range(args.rounds):
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            env = _env(args.a_env if side == "A" else args.b_env)
            out = subprocess.run(
                [sys.executable, __file__, "--child", *step_args], env=env, capture_output=True, text=True
            )
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"side {side} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            results[side].append(json.loads(line[-1][len("RESULT ") :]))
        a, b = results["A"][-1], results["B"][-1]
        print(
            f"round {r + 1}: A wall {a['wall'] * 1e3:7.1f} ms cpu {a['cpu'] * 1e3:7.1f} ms faults {a['faults']:8.0f} "
            f"sys {a['sys'] * 1e3:6.1f} ms | B wall {b['wall'] * 1e3:7.1f} ms cpu {b['cpu'] * 1e3:7.1f} ms "
            f"faults {b['faults']:8.0f} sys {b['sys'] * 1e3:6.1f} ms | load {open('/proc/loadavg').read().split()[0]}",
            flush=True,
        )
    print(
        f"A: {' '.join(args.a_env) or '(environment as is)'}; B: {' '.join(args.b_env) or '(environment as is)'}"
    )
    for key in ("wall", "cpu"):
        ratios = [a[key] / b[key] for a, b in zip(results["A"], results["B"])]
        print(
            f"A/B {key} step-time ratio (> 1: B faster): median {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
