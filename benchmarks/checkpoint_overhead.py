"""What the per-leaf checksums cost a checkpoint save, measured side by side in one run.

    python benchmarks/checkpoint_overhead.py [--params=100e6] [--leaves=200] [--repeats=3] [--dir=/tmp/x]

A train-state-shaped tree (params, EMA, Adam mu and nu: 4 x --params float32 values in --leaves arrays each)
on the default device(s). Times, each the median of --repeats:
  checksum      ddlm.checkpoints.leaf_checksums(state) (compiled once beforehand; device -> two uint32 per leaf)
  save blocking orbax CheckpointManager.save() until it returns (device -> host copy; the train loop waits)
  save total    until the checkpoint is committed on disk (the background write)
The checksum runs on the train thread before save() and blocks it, so the figure to compare it with is
"save blocking"; the ratio checksum / save blocking is the overhead the checksums add to what a save
already costs. On a GPU or TPU the checksum is a read of the state at memory bandwidth (well under 1 s for
1B parameters); run it there as is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ddlm import checkpoints


def make_state(num_params: int, num_leaves: int) -> dict:
    per_leaf = max(num_params // num_leaves, 1)
    cols = 1024
    rows = max(per_leaf // cols, 1)

    def tree(offset):  # random values: orbax compresses its array files, constants would flatter the save
        key = jax.random.key(offset)
        return {
            f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (rows, cols), jnp.float32)
            for i in range(num_leaves)
        }

    return {"params": tree(0), "ema_params": tree(1), "mu": tree(2), "nu": tree(3), "step": jnp.array(1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--leaves", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()

    state = make_state(int(args.params), args.leaves)
    jax.block_until_ready(state)
    n = sum(x.size for x in jax.tree.leaves(state))
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_overhead_")
    print(
        f"{jax.devices()[0].device_kind} x{jax.device_count()}: state of {n / 1e6:.0f}M values ({4 * n / 2**30:.2f} GiB)"
    )

    t0 = time.perf_counter()
    checkpoints.leaf_checksums(state)
    print(f"checksum compile + first run: {time.perf_counter() - t0:.2f}s")
    checksum = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        checkpoints.leaf_checksums(state)
        checksum.append(time.perf_counter() - t0)

    manager = ocp.CheckpointManager(
        os.path.join(root, "plain"), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    )
    blocking, total = [], []
    for step in range(args.repeats):
        t0 = time.perf_counter()
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        blocking.append(time.perf_counter() - t0)
        manager.wait_until_finished()
        total.append(time.perf_counter() - t0)
    manager.close()
    shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    print(f"checksum       {med(checksum):8.3f}s")
    print(f"save blocking  {med(blocking):8.3f}s")
    print(f"save total     {med(total):8.3f}s")
    print(
        f"checksum / save blocking = {med(checksum) / med(blocking):.2f}, "
        f"checksum / save total = {med(checksum) / med(total):.2f}"
    )


if __name__ == "__main__":
    main()
