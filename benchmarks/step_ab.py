"""Same-process, interleaved A/B of the train step: two ddlm checkouts, or two configs of one checkout.

    python benchmarks/step_ab.py --a=/path/to/main/checkout --b=.            # this branch vs another checkout
    python benchmarks/step_ab.py --b_set=model.dtype=bfloat16                # one config change, same code
    python benchmarks/step_ab.py --size=small --steps=3 --rounds=4 --a=../main --b=.
    python benchmarks/step_ab.py --size=small --compile_rounds=4 --a=../main --b=.   # compile time only

Both steps are built by the checkout's own trainer (`ddlm.train.trainer.build` + `compile_train_step`, the
step `train_and_evaluate` runs) for the peers' shapes (benchmarks/peers: experiments/mdlm.py resized, float32,
dropout 0, vocabulary 4096 + mask, one device, byte tokens), compiled once each, then run in alternating blocks
of --steps steps (A B, B A, A B, ...), so that the machine's load drifts hit both alike. Printed: each
block's median step time, wall-clock and process CPU time (all threads), the ratios A/B per round (> 1: B
is faster), and their median and spread; and each side's achieved fraction of the machine's matmul rate:
the step's model FLOPs (`ddlm.models.flops_per_token` x batch x length, the formula MFU uses; at the peers'
`small` shape 1,140.3 GFLOP a step) / its median step time / a 1024^3 float32 matmul's FLOP/s measured
just before each round (`matmul_rate`, the calibration of ../shared/peers/compare.sh). The fraction is the
figure that travels between machines, whose matmul speed differs. On a shared machine absolute times are
noise and wall-clock ratios swing by tens of percent with the other jobs; the CPU-time ratio (work done per
step) stays within a few percent, and on an idle machine both agree.

A checkout is loaded by putting its root first on sys.path and importing `ddlm` afresh (the modules of the
other one are dropped from sys.modules first): both compiled steps stay callable. Code that both checkouts
share (jax, flax, optax) is imported once; XLA flags are the process's, so they cannot differ between A and B
(benchmarks/process_ab.py compares flags in separate processes).
"""

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time

SIZES = {"tiny": (4, 256, 4), "small": (12, 768, 12)}  # (layers, d_model, heads), as benchmarks/peers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--a", default=here, help="root of checkout A (default: this one)")
    p.add_argument("--b", default=here, help="root of checkout B (default: this one)")
    p.add_argument("--a_set", action="append", default=[], help="config override for A: key.path=value")
    p.add_argument("--b_set", action="append", default=[], help="config override for B: key.path=value")
    p.add_argument("--config", default="experiments/mdlm.py", help="experiment file, relative to each root")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--layers", type=int, default=0, help="override the size's layer count")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="data ids; the model's vocabulary is vocab + 1")
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--rounds", type=int, default=5, help="A/B block pairs")
    p.add_argument(
        "--compile_rounds", type=int, default=0,
        help="only compile: A and B each traced, lowered and compiled this many times, alternately",
    )
    p.add_argument("--compile_one", choices=("A", "B"), help=argparse.SUPPRESS)  # compile_rounds' child
    return p.parse_args(argv)


def _set(config, assignment: str):
    """'model.dtype=bfloat16' -> config.model.dtype = 'bfloat16' (typed like the current value)."""
    path, _, value = assignment.partition("=")
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    old = node[leaf]
    if isinstance(old, bool):
        new = value.lower() in ("1", "true", "yes")
    elif old is None:
        new = value
    else:
        new = type(old)(value)
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[leaf] = new


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Tokenizer:
    """What trainer.build needs of a tokenizer: vocab_size (with the mask id) and mask_id."""

    def __init__(self, vocab_size, mask_id):
        self.vocab_size, self.mask_id = vocab_size, mask_id


def matmul_rate(n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of an [n, n] x [n, n] float32 matmul on the default device: 2 n^3 reps / seconds, the `reps`
    products dispatched back to back after one warm-up (../shared/peers/compare.sh's calibration)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        r = mm(a)
    r.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def compile_rounds(args, argv):
    """Compile time A/B: each side's train step traced, lowered and compiled `args.compile_rounds` times, each
    time in a fresh process (`--compile_one=A|B`, the rest of the command line as given), A and B alternating.
    Separate processes because in one process the compiles are not alike: a process's first compile pays
    one-off costs (~20% more CPU time at the tiny shape), and even after a warm-up two builds of the same
    checkout compiled 7-16% apart. Prints wall-clock and process CPU seconds (the compile runs on all threads)
    per compile, their medians and the per-round ratios A/B (> 1: B compiles faster)."""
    import subprocess

    times = {"A": [], "B": []}
    for r in range(args.compile_rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv, f"--compile_one={name}"],
                capture_output=True, text=True, check=True,
            ).stdout
            wall, cpu = (float(x) for x in out.split("COMPILE ")[1].split()[:2])
            times[name].append((wall, cpu))
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            print(f"compile {name}: wall {wall:6.2f} s, process CPU {cpu:6.2f} s (load {load})", flush=True)
    for i, what in ((0, "wall-clock"), (1, "process CPU")):
        a = statistics.median(t[i] for t in times["A"])
        b = statistics.median(t[i] for t in times["B"])
        per_round = [ta[i] / tb[i] for ta, tb in zip(times["A"], times["B"])]
        print(
            f"compile {what}: A {a:.2f} s, B {b:.2f} s (medians of {len(times['A'])}); A/B per round median "
            f"{statistics.median(per_round):.3f}, range {min(per_round):.3f}-{max(per_round):.3f}"
        )


def compile_one(args):
    """One side's train step built and compiled once in this process; prints `COMPILE wall cpu` (seconds)."""
    root, overrides = (args.a, args.a_set) if args.compile_one == "A" else (args.b, args.b_set)
    setup, trainer = _build(root, overrides, args)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.compile_train_step(setup)
    print(f"COMPILE {time.perf_counter() - t0:.3f} {time.process_time() - c0:.3f}", flush=True)


def _import_checkout(root: str, *names):
    """The modules `names` of checkout `root`'s own ddlm, imported afresh (any other checkout's dropped)."""
    for name in [m for m in sys.modules if m == "ddlm" or m.startswith("ddlm.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(root))
    try:
        importlib.invalidate_caches()
        # The second checkout's tfds builders have the first one's names: skip tfds's name registry (no
        # data is read here).
        from tensorflow_datasets.core import registered

        with registered.skip_registration():
            ddlm = importlib.import_module("ddlm")
            modules = [importlib.import_module(n) for n in names]
        assert os.path.abspath(ddlm.__file__).startswith(os.path.abspath(root)), ddlm.__file__
        return modules
    finally:
        sys.path.pop(0)


def _build(root: str, overrides, args):
    """(setup, trainer module) of checkout `root` for the peers' shape: its own ddlm imported afresh."""
    import jax

    tokenizers, trainer = _import_checkout(root, "ddlm.data.tokenizers", "ddlm.train.trainer")
    config = _config(root, overrides, args)
    tokenizers.get_tokenizer = lambda data_config: _Tokenizer(args.vocab + 1, args.vocab)
    return trainer.build(config, jax.devices()[:1]), trainer


def _config(root: str, overrides, args):
    """The experiment's config at the peers' shape (see the module docstring), with `overrides` applied."""
    spec = importlib.util.spec_from_file_location("experiment", os.path.join(root, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("size=small")
    layers, dim, heads = SIZES[args.size]
    m = config.model
    m.num_layers, m.d_model, m.num_heads = args.layers or layers, dim, heads
    m.mlp_dim, m.cond_dim, m.dropout, m.dtype = 4 * dim, 128, 0.0, "float32"
    config.data.corpus = "shakespeare"  # unused: batches are made here
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    t = config.train
    t.batch_size = t.eval_batch_size = args.batch
    t.seq_len = args.seq
    t.steps = 10_000
    for assignment in overrides:
        _set(config, assignment)
    return config


def load_step(root: str, overrides, args):
    """(compiled step, initial state, get_batch, description, compile seconds, model FLOPs per step) built
    by checkout `root`."""
    import jax
    import numpy as np

    setup, trainer = _build(root, overrides, args)
    models = sys.modules["ddlm.models"]  # the checkout's own, imported by trainer.build
    state = setup.init_state()
    t0 = time.perf_counter()
    compiled = trainer.compile_train_step(setup)
    compile_s = time.perf_counter() - t0
    flops = models.flops_per_token(setup.config.model, args.vocab + 1, args.seq) * args.batch * args.seq

    rng = np.random.default_rng(0)
    batches = [
        jax.device_put(
            {
                "tokens": rng.integers(0, 256, (args.batch, args.seq), dtype=np.int32),
                "loss_mask": np.ones((args.batch, args.seq), np.float32),
            },
            setup.batch_sharding,
        )
        for _ in range(4)
    ]
    state, metrics = compiled(state, batches[0])  # first execution (allocations, caches)
    jax.block_until_ready(metrics)
    desc = f"{root} {' '.join(overrides)}".strip()
    return compiled, state, (lambda i: batches[i % len(batches)]), desc, compile_s, flops


def run_block(compiled, state, get_batch, steps):
    import jax

    times, cpu = [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, get_batch(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return state, statistics.median(times), statistics.median(cpu), float(metrics["loss"])


def main(argv=None):
    args = parse_args(argv)
    import jax

    if args.compile_one:
        return compile_one(args)
    if args.compile_rounds:
        return compile_rounds(args, sys.argv[1:] if argv is None else list(argv))

    sides, flops = {}, {}
    for name, root, overrides in (("A", args.a, args.a_set), ("B", args.b, args.b_set)):
        compiled, state, get_batch, desc, compile_s, flops[name] = load_step(root, overrides, args)
        sides[name] = [compiled, state, get_batch]
        print(f"{name}: {desc} | compile {compile_s:.1f}s | {flops[name] / 1e9:.1f} GFLOP a step", flush=True)
    layers = args.layers or SIZES[args.size][0]
    print(
        f"shape {args.size} ({layers} layers), batch {args.batch} x {args.seq}, vocab {args.vocab}+1, "
        f"{jax.devices()[0].device_kind}, load {open('/proc/loadavg').read().split()[:3]}",
        flush=True,
    )
    ratios, cpu_ratios = [], []
    calibrations, fractions = [], {"A": [], "B": []}
    for r in range(args.rounds):
        calibrations.append(matmul_rate())
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        ms, cpu_ms = {}, {}
        for name in order:
            compiled, state, get_batch = sides[name]
            state, med, cpu, loss = run_block(compiled, state, get_batch, args.steps)
            sides[name][1] = state
            ms[name], cpu_ms[name] = med * 1e3, cpu * 1e3
        ratios.append(ms["A"] / ms["B"])
        cpu_ratios.append(cpu_ms["A"] / cpu_ms["B"])
        for name, step_ms in ms.items():
            fractions[name].append(achieved_fraction(flops[name], step_ms / 1e3, calibrations[-1]))
        print(
            f"round {r + 1}: wall A {ms['A']:8.1f} ms | B {ms['B']:8.1f} ms | A/B {ratios[-1]:.3f}; "
            f"cpu A {cpu_ms['A']:8.1f} ms | B {cpu_ms['B']:8.1f} ms | A/B {cpu_ratios[-1]:.3f}; "
            f"matmul {calibrations[-1] / 1e9:.0f} GFLOP/s, fraction of it A {fractions['A'][-1]:.2f} "
            f"B {fractions['B'][-1]:.2f} (load {open('/proc/loadavg').read().split()[0]})",
            flush=True,
        )
    for what, values in (("wall-clock", ratios), ("process CPU", cpu_ratios)):
        print(
            f"A/B {what} step-time ratio (> 1: B faster): median {statistics.median(values):.3f}, "
            f"range {min(values):.3f}-{max(values):.3f} over {len(values)} rounds"
        )
    print(
        f"achieved / calibrated 1024^3 float32 matmul rate (median of rounds): A {statistics.median(fractions['A']):.3f}, "
        f"B {statistics.median(fractions['B']):.3f}; calibration {min(calibrations) / 1e9:.0f}-"
        f"{max(calibrations) / 1e9:.0f} GFLOP/s"
    )


def achieved_fraction(flops_per_step: float, step_seconds: float, matmul_flops_per_second: float) -> float:
    """The step's model FLOP/s as a fraction of the calibrated matmul rate."""
    return flops_per_step / step_seconds / matmul_flops_per_second


if __name__ == "__main__":
    main()
