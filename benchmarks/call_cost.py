"""The cost of ONE cached decoder call as a function of the tokens it processes (k), per model size.

    python benchmarks/call_cost.py                                   # tiny..1b, k 1,4,16,64, batch 1 and 8
    python benchmarks/call_cost.py --sizes=small,medium,1b --repeats=3   # the device suite's configuration
    python benchmarks/call_cost.py --dry-run                         # tiny, short context, once: checks the script

Parallel decoding (k tokens per network call instead of 1) only saves time if a call on k tokens costs less than
k calls on one. This measures that on the current device: the call is what the samplers make, one
`decoder.step` (ddlm.models.make_decoder, ddlm/sampling/autoregressive.py and block.py) on k new tokens at
positions context..context+k-1 that attend a KV cache holding --context filled positions and, causally, each
other; their keys/values are written at slot `context`, the logits [batch, k, vocab] come back. The cache is
donated and fed back, as a sampler's loop carry (an undonated write would copy the whole cache every call).

Networks: the causal ('ar') network of each preset (ddlm.models.default_config; tiny is the quickstart's), time
free, random weights (the cost does not depend on them), --vocab (default GPT-2 + mask: the presets' parameter
counts are quoted at it), compute dtype 'auto' (bfloat16 on a GPU, float32 on CPU), parameters in
--param_dtype (float32: what a checkpoint loads). The cache holds zeros (its values do not change the cost;
a prefill of 512 tokens of a 1B network would take minutes on a CPU). Capacity = context + max(k), the same
for every k, so that only the tokens per call change. A size whose parameters and cache do not fit in the
device's free memory is skipped with a row that says so.

Each (size, batch, k) is compiled once (excluded), called once to warm up, then --repeats times; the median
counts. Columns: ms per call, ms per token (= call / k), and cost(k) / cost(1) against the same size and
batch: k means the call costs as much as k calls of one token (compute-bound: parallel decoding cannot save
time), ~1 means a call of k tokens is as cheap as one of 1 (memory-bound: it can).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import machine  # benchmarks/machine.py

from ddlm import models

GPT2_VOCAB = 50258  # GPT-2's 50,257 + the mask id


def build(size: str, vocab: int, param_dtype: str):
    """(model, abstract params) of the causal network of preset `size`; nothing is materialised."""
    mc = models.default_config(size)
    mc.name, mc.dropout, mc.time_conditioning, mc.param_dtype = "ar", 0.0, False, param_dtype
    model = models.get_model(mc, vocab)
    x = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda k: nn.unbox(model.init(k, x, None, train=False))["params"], jax.random.key(0))
    return model, abstract


def init_params(model, abstract):
    """Random parameters (the output layer perturbed off its zero init, so the logits are not all equal)."""
    x = jnp.zeros((1, 8), jnp.int32)

    def init(key):
        params = dict(nn.unbox(model.init(key, x, None, train=False))["params"])
        kernel = params["output_kernel"]
        params["output_kernel"] = (jax.random.normal(jax.random.key(1), kernel.shape) * 0.02).astype(kernel.dtype)
        return params

    return jax.jit(init)(jax.random.key(0))


def millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def cache_bytes(model, batch: int, capacity: int) -> int:
    heads, head_dim = model.cache_layout
    return 2 * model.num_layers * batch * capacity * heads * head_dim * jnp.dtype(model.dtype).itemsize


def free_bytes() -> int | None:
    """Bytes the first device can still allocate: the GPU's limit minus its use; on the host, the free memory
    plus what this process holds beyond its live arrays (freed arrays stay with the allocator, not the OS)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            available = int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
        with open("/proc/self/status") as f:
            rss = int(dict(line.split(":", 1) for line in f)["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available + max(0, rss - sum(x.nbytes for x in jax.live_arrays()))


def make_call(model, context: int, k: int, write: bool = True):
    """call(params, cache, tokens [B, k]) -> (logits [B, k, V], cache): one decoder step, the cache donated."""

    def call(params, cache, tokens):
        decoder = models.make_decoder(model, {"params": params})
        capacity = cache.keys[0].shape[1]
        attend = jnp.arange(capacity) < context  # the filled context; the slice's own keys via self_attend
        return decoder.step(
            cache, tokens, context + jnp.arange(k), attend, models.causal_mask(k), None, context if write else None
        )

    return jax.jit(call, donate_argnums=1)


def time_call(model, params, batch: int, context: int, capacity: int, k: int, repeats: int, write: bool = True):
    """(median seconds of one call, compile seconds)."""
    cache = models.init_cache(model, batch, capacity)
    tokens = jax.random.randint(jax.random.key(k), (batch, k), 0, model.vocab_size - 1, jnp.int32)
    t0 = time.perf_counter()
    fn = make_call(model, context, k, write).lower(params, cache, tokens).compile()
    compile_s = time.perf_counter() - t0
    logits, cache = fn(params, cache, tokens)  # warm-up
    jax.block_until_ready((logits, cache))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, cache = fn(params, cache, tokens)
        jax.block_until_ready((logits, cache))
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), compile_s


def header(args) -> str:
    return (
        f"{machine.describe()}; "
        f"causal networks, random weights, vocab {args.vocab}, params {args.param_dtype}, context {args.context}, "
        f"median of {args.repeats}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small,medium,1b", help="presets: tiny (quickstart) | small | medium | 1b")
    parser.add_argument("--tokens", default="1,4,16,64", help="k, tokens per call (the first is the ratio's base)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=512, help="filled cache positions the new tokens attend")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="vocabulary incl. the mask id")
    parser.add_argument("--param_dtype", default="float32", help="float32 (a checkpoint) | bfloat16")
    parser.add_argument(
        "--no_write", action="store_true", help="the slice only reads the cache (a noised block's step) instead of writing its keys"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny, context 16, k 1 and 4, batch 1 and 2, once")
    args = parser.parse_args()
    if args.dry_run:
        args.sizes, args.tokens, args.batches, args.context, args.repeats = "tiny", "1,4", "1,2", 16, 1
    sizes = args.sizes.split(",")
    tokens = [int(k) for k in args.tokens.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    capacity = args.context + max(tokens)
    print(header(args), flush=True)
    start = time.time()
    # Batch outermost, each row printed when measured: a run cut short (the device suite's timeout) keeps its
    # rows. The parameters are initialised again per batch (seconds; one size in memory at a time).
    for b in batches:
        print(f"\n### batch {b}, context {args.context}\n")
        print("| size | params | k (tokens / call) | ms / call | ms / token | cost(k) / cost(1) | compile s |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for size in sizes:
            model, abstract = build(size, args.vocab, args.param_dtype)
            n_params = models.count_params(abstract)
            need = n_params * jnp.dtype(args.param_dtype).itemsize + cache_bytes(model, b, capacity)
            free = free_bytes()
            if free is not None and need > 0.8 * free:
                print(f"| {size} | {millions(n_params)} | skipped: needs {need / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB free | | | | |", flush=True)  # fmt: skip
                continue
            params = init_params(model, abstract)
            base = None
            for k in tokens:
                seconds, compile_s = time_call(
                    model, params, b, args.context, capacity, k, args.repeats, not args.no_write
                )
                base = base or seconds
                print(f"| {size} | {millions(n_params)} | {k} | {1e3 * seconds:.2f} | {1e3 * seconds / k:.3f} "
                      f"| {seconds / base:.2f} | {compile_s:.1f} |", flush=True)  # fmt: skip
            del params
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
