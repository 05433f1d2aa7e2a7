"""Train-step tokens/s of an experiment's network next to the data pipeline's tokens/s on this machine.

    python benchmarks/train_throughput.py                      # MDLM 'small' (12x768), batch 4 x 256, CPU ok
    python benchmarks/train_throughput.py --config=experiments/mdlm.py --batch_size=8 --seq_len=1024 --steps=10

The pipeline must not be the bottleneck: the script prints both rates and their ratio (pipeline / train);
a ratio above 1 means the input pipeline keeps up. The corpus defaults to Shakespeare with the config's
tokenizer (OpenWebText need not be present); the network, loss and optimizer are the config's.
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="experiments/mdlm.py", help="experiment file[:arg]")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up step)")
    parser.add_argument("--data_batches", type=int, default=50, help="timed pipeline batches")
    parser.add_argument("--corpus", default="shakespeare")
    args = parser.parse_args()

    import jax
    import numpy as np

    from ddlm.train import trainer

    path, _, arg = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.data.corpus = args.corpus
    config.train.batch_size = config.train.eval_batch_size = args.batch_size
    config.train.seq_len = args.seq_len
    config.model.dtype = "float32" if jax.devices()[0].platform == "cpu" else config.model.dtype
    config.mesh.fsdp = config.mesh.tensor = 1
    tokens_per_batch = args.batch_size * args.seq_len

    # ---- data pipeline
    setup = trainer.build(config)
    it = trainer.make_iterator(setup, "train", batch_size=args.batch_size)
    jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    for _ in range(args.data_batches):
        batch = next(it)
    jax.block_until_ready(batch)
    data_tps = args.data_batches * tokens_per_batch / (time.perf_counter() - t0)

    # ---- train step
    from ddlm.models import flops_per_token
    from ddlm.train import metrics as metrics_lib
    from ddlm.train import state as state_lib

    state = setup.init_state()
    t_compile = time.perf_counter()
    step = trainer.compile_train_step(setup)
    t_compile = time.perf_counter() - t_compile
    state, m = step(state, next(it))
    jax.block_until_ready(state)
    batches = [next(it) for _ in range(args.steps)]
    t0 = time.perf_counter()
    for b in batches:
        state, m = step(state, b)
    jax.block_until_ready(state)
    step_time = (time.perf_counter() - t0) / args.steps
    train_tps = tokens_per_batch / step_time
    flops = flops_per_token(config.model, setup.tokenizer.vocab_size, args.seq_len)
    mfu = flops * train_tps / metrics_lib.peak_flops_per_second(config.train.peak_flops_per_device)

    print(
        f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; config {args.config}: "
        f"{config.model.name} {config.model.num_layers}x{config.model.d_model}, "
        f"{state_lib.count_params(state.params):,} params, loss {config.diffusion.loss}, "
        f"batch {args.batch_size} x {args.seq_len}, tokenizer {config.data.tokenizer} (vocab {setup.tokenizer.vocab_size})"
    )
    print(f"compile: {t_compile:.1f}s; train step: {step_time * 1000:.0f} ms, loss {float(m['loss']):.3f}")
    print(f"train step:    {train_tps:12,.0f} tokens/s  (MFU {100 * mfu:.1f}% of an estimated peak)")
    print(
        f"data pipeline: {data_tps:12,.0f} tokens/s  ({config.data.tokenizer} on {args.corpus}, "
        f"num_workers={config.data.num_workers})"
    )
    print(
        f"ratio pipeline / train: {data_tps / train_tps:.1f}x  "
        f"({'pipeline keeps up' if data_tps > train_tps else 'PIPELINE IS THE BOTTLENECK'})"
    )
    del np


if __name__ == "__main__":
    main()
