"""How long importing a Hugging Face LLaMA checkpoint takes (ddlm.convert), on a 1B-shaped random one.

    python benchmarks/import_timing.py [--size=1b] [--dir=/tmp/x] [--devices=1]
    python benchmarks/import_timing.py --dry-run      # the tiny shape: a check of the script

Writes a random checkpoint of the TinyLlama-1.1B shape (ddlm.models.llama_config('1b'): config.json, bfloat16
*.safetensors in shards of about 1 GB written with safetensors from numpy, a small tokenizer.json; nothing from
transformers), then times ddlm.convert.convert on it: reading the headers, the load onto the mesh (one
tensor at a time, each device sent its shard) and the checkpoint write (orbax + per-leaf checksums). With
--devices=N > 1 the CPU is split into N fake devices (the load then shards over data x fsdp x tensor as
config.mesh says: plain data parallelism replicates). Prints the seconds and GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(directory: str, size: str, shard_params: float = 5e8) -> int:
    """A random LLaMA checkpoint of preset `size` in Hugging Face's layout; returns the parameter count."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer
    from tokenizers import models as tm

    sys.path.insert(0, REPO)
    from ddlm.models import hf as hf_layout
    from ddlm.models import llama_config

    c, vocab = llama_config(size)
    vocab = vocab or 259
    hf = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": c.d_model, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads or c.num_heads, "rms_norm_eps": 1e-5, "rope_theta": c.rope_base,
        "tie_word_embeddings": False, "max_position_embeddings": 2048, "hidden_act": "silu",
    }  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    model_config, _ = hf_layout.model_config_from_hf(hf)
    plan = hf_layout.tensor_plan(model_config, vocab)
    rng = np.random.default_rng(0)
    shard, count, total, index = {}, 0, 0, 0
    for name, (_, shape, _) in plan.items():
        shard[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        count += int(np.prod(shape))
        total += int(np.prod(shape))
        if count >= shard_params:
            save_file(shard, os.path.join(directory, f"model-{index:05d}.safetensors"))
            shard, count, index = {}, 0, index + 1
    if shard:
        save_file(shard, os.path.join(directory, f"model-{index:05d}.safetensors"))
    tok = Tokenizer(tm.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1b", choices=["tiny", "1b", "llada_8b"])
    p.add_argument("--dir", default="")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if args.dry_run:
        args.size = "tiny"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    root = args.dir or tempfile.mkdtemp(prefix="ddlm_import_")
    hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "converted")
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    n = write_checkpoint(hf_dir, args.size)
    written = time.time() - t0
    size_gb = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)) / 1e9

    import jax

    from ddlm import convert
    from ddlm.models import hf as hf_layout

    t0 = time.time()
    index = hf_layout.index_safetensors(hf_dir)
    headers = time.time() - t0
    timings = {}
    t0 = time.time()
    convert.convert(hf_dir, workdir, timings=timings)
    total = time.time() - t0
    ckpt_gb = (
        sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(os.path.join(workdir, "checkpoints"))
            for f in files
        )
        / 1e9
    )
    print(
        f"{args.size}: {n:,} parameters in {len(index)} tensors, {size_gb:.2f} GB of bfloat16 safetensors "
        f"(written in {written:.0f}s); {jax.device_count()} {jax.devices()[0].platform} device(s)\n"
        f"  headers {headers:.2f}s | load onto the mesh (float32) {timings['load_s']:.1f}s "
        f"({size_gb / timings['load_s']:.2f} GB/s read) | checkpoint write {timings['save_s']:.1f}s "
        f"({ckpt_gb:.2f} GB) | convert() total {total:.1f}s"
    )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
