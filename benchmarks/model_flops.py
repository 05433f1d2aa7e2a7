"""Parameter counts and training FLOPs per token of the model presets, and a check of the 6N + attention
estimate (`ddlm.models.flops_per_token`, used by the trainer for MFU) against XLA's own count.

    python benchmarks/model_flops.py [--seq_len=1024] [--vocab_size=50258]

Part 1 needs no compute (jax.eval_shape). Part 2 compiles the training gradient of small models on the local
backend and reads `compiled.cost_analysis()['flops']`; the ratio estimate / XLA should be close to 1 (XLA also
counts the element-wise work: norms, GELU, softmax, which the estimate leaves out).
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from ddlm import models


def abstract_params(model, name, batch, seq_len):
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    x0 = tokens if name == "bd3lm" else None
    return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), tokens, t, x0=x0)["params"]


def presets(seq_len, vocab_size):
    print(f"Presets (vocab_size={vocab_size}, seq_len={seq_len}): params in M, training GFLOP per token")
    print(f"{'size':8s} {'model':6s} {'total':>8s} {'non-emb':>8s} {'GFLOP/tok':>10s} {'6N share':>9s}")
    for size in ("tiny", "small", "medium", "1b"):
        for name in ("dit", "ar", "bd3lm"):
            config = models.default_config(size)
            config.name = name
            config.time_conditioning = name == "dit"
            params = abstract_params(models.get_model(config, vocab_size), name, 1, seq_len)
            total = models.count_params(params)
            emb = models.count_params(
                {k: v for k, v in params.items() if k.startswith(("token_", "output_"))}
            )
            fpt = models.flops_per_token(config, vocab_size, seq_len)
            six_n = models.flops_per_token(config, vocab_size, 0)  # no attention term
            row = f"{total / 1e6:8.1f} {(total - emb) / 1e6:8.1f} {fpt / 1e9:10.3f} {six_n / fpt:9.2f}"
            print(f"{size:8s} {name:6s} {row}")


def check_against_xla(vocab_size=1000, seq_len=256, batch=2):
    print(f"\nEstimate vs XLA's cost analysis of the training gradient (batch={batch}, seq_len={seq_len})")
    for name, time_conditioning in (("dit", True), ("ar", False), ("bd3lm", False), ("bd3lm", True)):
        config = models.default_config("tiny")
        config.update(name=name, num_layers=4, d_model=256, num_heads=4, mlp_dim=1024, cond_dim=64)
        config.block_size = 16
        config.time_conditioning = time_conditioning
        model = models.get_model(config, vocab_size)
        params = abstract_params(model, name, batch, seq_len)
        tokens = jnp.zeros((batch, seq_len), jnp.int32)
        t = jnp.full((batch, seq_len) if name == "bd3lm" else (batch,), 0.5) if time_conditioning else None
        x0 = tokens if name == "bd3lm" else None

        def loss(p, model=model, tokens=tokens, t=t, x0=x0):
            return jnp.mean(model.apply({"params": p}, tokens, t, x0=x0) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla = cost["flops"] / (batch * seq_len)
        est = models.flops_per_token(config, vocab_size, seq_len)
        print(
            f"  {name:6s} time_conditioning={time_conditioning!s:5s}  estimate {est / 1e6:8.1f} MFLOP/tok   "
            f"XLA {xla / 1e6:8.1f} MFLOP/tok   ratio {est / xla:.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=50_258)
    args = parser.parse_args()
    presets(args.seq_len, args.vocab_size)
    check_against_xla()
