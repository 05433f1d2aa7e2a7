"""Train-step throughput and MFU of a preset on the device at hand, for each remat policy; markdown rows.

    python benchmarks/device_step.py --preset=small --seq=1024 --batch=16 --attention=cudnn   # a GPU
    python benchmarks/device_step.py --dry-run                                                 # CPU, seconds

The step is the trainer's own (experiments/mdlm.py at the preset: DiT, MDLM loss, AdamW, EMA, GPT-2
vocabulary 50,258) with the layer scan on, compiled once per remat policy, on one device. tokens/s is the
median of --steps executed steps after a warm-up; MFU = flops_per_token x tokens/s / the device's peak
(ddlm.train.metrics.peak_flops_per_second: bf16 dense peak for accelerators). A policy that does not fit
(RESOURCE_EXHAUSTED) is reported as such and the next one is tried. --dry-run: preset tiny, L=64, batch 2,
float32, XLA attention (or pallas_interpret if asked), 2 steps: traces and compiles
everything the device suite runs. --experiment=bd3lm --attention=xla|pallas: the BD3-LM step (2L input), the
dense against the block-sparse attention kernel (MFU counts dense attention FLOPs for both).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (one device)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="cudnn", help="config.model.attention_impl: xla | cudnn | pallas")
    p.add_argument("--experiment", default="mdlm", help="experiments/<name>.py: mdlm (DiT) or bd3lm (2L input)")
    p.add_argument("--remat", default="none,dots_saveable,full", help="policies to try, in order")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget_s", type=float, default=0, help="skip policies once this much time is spent")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:  # attention: XLA's for cudnn/pallas (GPU only); pallas_interpret is kept
        args.preset, args.seq, args.batch, args.dtype, args.steps = "tiny", 64, 2, "float32", 2
        if args.attention in ("cudnn", "pallas"):
            args.attention = "xla"
    import jax

    import memory
    from ddlm.models import flops_per_token
    from ddlm.train import metrics as metrics_lib

    t_start = time.time()
    kind = jax.devices()[0].device_kind
    peak = metrics_lib.peak_flops_per_second() / jax.device_count()
    try:
        rev = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = "?"
    print(
        f"\n{kind} ({jax.default_backend()}), experiments/{args.experiment}.py, preset {args.preset}, "
        f"L={args.seq}, batch {args.batch}, {args.dtype}, attention {args.attention}, scan on, revision {rev}, "
        f"peak {peak / 1e12:.3g} TFLOP/s\n"
    )
    print("| preset | remat | tokens/s | step ms | MFU | compile s | temp GB | arguments GB |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in args.remat.split(","):
        if args.budget_s and time.time() - t_start > args.budget_s:
            print(f"| {args.preset} | {policy} | skipped: time budget | | | | | |")
            continue
        try:
            t0 = time.time()
            compiled, setup = _compile(memory, args, policy)
            compile_s = time.time() - t0
            mem = compiled.memory_analysis()
            state = setup.init_state()
            batch = _batch(setup, args)
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- an out-of-memory policy is a row, not the end of the suite
            if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
                raise
            print(f"| {args.preset} | {policy} | out of memory | | | | | |", flush=True)
            continue
        step = statistics.median(times)
        tokens_per_s = args.batch * args.seq / step
        fpt = flops_per_token(setup.config.model, setup.tokenizer.vocab_size, args.seq)
        mfu = fpt * tokens_per_s / peak
        print(
            f"| {args.preset} | {policy} | {tokens_per_s:,.0f} | {step * 1e3:.1f} | {100 * mfu:.1f}% | "
            f"{compile_s:.1f} | {mem.temp_size_in_bytes / 1e9:.2f} | {mem.argument_size_in_bytes / 1e9:.2f} |",
            flush=True,
        )
        del state, compiled


def _compile(memory, args, policy):
    return memory.compile_step(
        args.preset, seq=args.seq, batch_per_device=args.batch, dtype=args.dtype, remat=policy, scan=True,
        mesh=(1, 1, 1), attention_impl=args.attention, experiment=args.experiment,
    )  # fmt: skip


def _batch(setup, args):
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, setup.tokenizer.mask_id, (args.batch, args.seq), dtype=np.int32)
    return jax.device_put(
        {"tokens": tokens, "loss_mask": np.ones((args.batch, args.seq), np.float32)}, setup.batch_sharding
    )


if __name__ == "__main__":
    main()
