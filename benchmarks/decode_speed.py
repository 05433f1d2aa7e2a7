"""The speed table: generated tokens/s and NFE of every sampler, as a ratio to the autoregressive baseline
(a causal network of the same size decoding with its KV cache), measured side by side in one run.

    python benchmarks/decode_speed.py                      # quickstart size (tiny), batch 1 and 8, L 256 and 1024
    python benchmarks/decode_speed.py --size=small --vocab=50258 --lengths=256 --batches=8
    python benchmarks/decode_speed.py --device-suite       # small, GPT-2 vocab, the same grid, < 8 min on a GPU
    python benchmarks/decode_speed.py --dry-run            # every row once, tiny and short: checks the script
    python benchmarks/decode_speed.py --workdir=runs/quickstart --lengths=128 --only=threshold,LLaDA,EB

Networks have random weights (speed does not depend on them; the adaptive parallel rules' NFE does: with a
near-uniform random network they commit about one token per step, so their rows here are an upper bound
on NFE). Masked-diffusion rows use a time-free bidirectional DiT, BD3-LM rows a time-free block-causal
network, the AR rows a causal one, all of --size. With --workdir the masked-diffusion rows use the trained
DiT of that run's latest checkpoint instead (ddlm.loading.load_for_inference: its size, vocabulary, time
conditioning and mask id; EMA parameters), so that threshold / EB commit what a trained model is confident
about; the AR and BD3-LM rows keep random weights of the same size (their NFE and time do not depend on the
weights). Each sampler is compiled once per (batch, length) (compilation excluded from the time), then run
--repeats times; the best time counts. tokens/s = batch x length / seconds; "vs AR" = tokens/s over the
AR-with-cache row of the same cell.

A new row is one line in ENTRIES: (label, network kind, the config.sampler fields). The Fast-dLLM rows
('+ prefix cache', '+ dual cache': config.sampler.cache, refreshed once per block) decode the same DiT through
its KV-cache path (ddlm.sampling.caches).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import machine  # benchmarks/machine.py
import ml_collections

from ddlm import models, sampling, schedules


class Entry(NamedTuple):
    label: str
    network: str  # 'ar' | 'dit' | 'bd3lm4' | 'bd3lm16' (block size after 'bd3lm')
    fields: Callable[[int], dict[str, Any]]  # length -> config.sampler fields


def _fixed(**fields):
    return lambda length: fields


BLOCK_LENGTH = 32  # semi-autoregressive blocks of the parallel decoders (LLaDA's default)

# The rows, in order of importance (the device suite's time budget drops the tail first). The first row is
# the baseline of the ratios.
ENTRIES: tuple[Entry, ...] = (
    Entry("ar, KV cache", "ar", _fixed(name="ar")),
    Entry("bd3lm block 4, KV cache", "bd3lm4", _fixed(name="bd3lm", block_sampler="first_hitting")),
    Entry("bd3lm block 16, KV cache", "bd3lm16", _fixed(name="bd3lm", block_sampler="first_hitting")),
    Entry("first_hitting", "dit", _fixed(name="first_hitting")),
    Entry("ancestral, L steps", "dit", lambda n: {"name": "ancestral", "steps": n}),
    *(
        Entry(
            f"LLaDA low_confidence, L/{d} steps",
            "dit",
            lambda n, d=d: _fixed(name="parallel", rule="low_confidence", steps=n // d, block_length=BLOCK_LENGTH)(n),
        )
        for d in (2, 4, 8)
    ),
    Entry("threshold 0.9", "dit", _fixed(name="parallel", rule="threshold", threshold=0.9, block_length=BLOCK_LENGTH)),
    Entry("threshold 0.9 + prefix cache", "dit", _fixed(name="parallel", rule="threshold", threshold=0.9, block_length=BLOCK_LENGTH, cache="prefix")),
    Entry("threshold 0.9 + dual cache", "dit", _fixed(name="parallel", rule="threshold", threshold=0.9, block_length=BLOCK_LENGTH, cache="dual")),
    Entry(
        "LLaDA low_confidence, L/4 steps + dual cache",
        "dit",
        lambda n: _fixed(name="parallel", rule="low_confidence", steps=n // 4, block_length=BLOCK_LENGTH, cache="dual")(n),
    ),
    Entry("EB gamma 0.1", "dit", _fixed(name="parallel", rule="entropy_bounded", gamma=0.1, block_length=BLOCK_LENGTH)),
    Entry("bd3lm block 16, no cache", "bd3lm16", _fixed(name="bd3lm", block_sampler="first_hitting", kv_cache=False)),
    Entry("ar, no cache", "ar", _fixed(name="ar", kv_cache=False)),
)  # fmt: skip


class Network(NamedTuple):
    model: Any
    params: Any
    vocab: int
    mask_id: int


def build_network(kind: str, size: str | ml_collections.ConfigDict, vocab: int) -> Network:
    """A random network for a row's network kind: of a preset `size`, or the shape of a model config."""
    mc = models.default_config(size) if isinstance(size, str) else ml_collections.ConfigDict(size.to_dict())
    mc.dropout, mc.time_conditioning = 0.0, False
    mc.name = "bd3lm" if kind.startswith("bd3lm") else kind
    if kind.startswith("bd3lm"):
        mc.block_size = int(kind[len("bd3lm") :])
    model = models.get_model(mc, vocab)
    x = jnp.zeros((1, 2 * mc.block_size), jnp.int32)
    params = nn.unbox(
        jax.jit(lambda k: model.init(k, x, None, x0=x if mc.name == "bd3lm" else None))(jax.random.key(0))
    )["params"]
    # The output layer starts at zero (uniform predictions): perturb it so that sampling sees real logits.
    params = dict(params)
    params["output_kernel"] = jax.random.normal(jax.random.key(1), params["output_kernel"].shape) * 0.02
    return Network(model, params, vocab, vocab - 1)


def load_network(workdir: str) -> tuple[Network, ml_collections.ConfigDict]:
    """The trained DiT of `workdir`'s latest checkpoint (EMA parameters) on one device, and its config."""
    from ddlm import loading

    loaded = loading.load_for_inference(workdir, devices=jax.devices()[:1])
    if loaded.config.model.name != "dit":
        raise ValueError(
            f"--workdir={workdir}: the masked-diffusion rows need a 'dit' network, got "
            f"config.model.name={loaded.config.model.name!r}"
        )
    tok = loaded.tokenizer
    return Network(loaded.model, loaded.params, tok.vocab_size, tok.mask_id), loaded.config


def make_run(entry: Entry, net: Network, length: int):
    """run(params, rng, x_init) -> SampleOutput for one row (pure, to be jitted)."""
    cfg = sampling.default_config()
    cfg.update(entry.fields(length))
    sched = schedules.LogLinearSchedule()
    model = net.model
    time_conditioning = getattr(model, "time_conditioning", False)

    def run(params, rng, x):
        variables = {"params": params}
        decoder = models.make_decoder(model, variables)
        if cfg.name in sampling.CACHED_SAMPLERS:
            return sampling.make_sampler(cfg, decoder=decoder, schedule=sched, mask_id=net.mask_id)(rng, x)
        denoise_fn = lambda xt, t: model.apply(
            variables, xt, t if time_conditioning else None, x0=None, train=False
        )
        return sampling.make_sampler(
            cfg, denoise_fn=denoise_fn, decoder=decoder, schedule=sched, mask_id=net.mask_id
        )(rng, x)

    return run


def time_row(entry: Entry, net: Network, batch: int, length: int, repeats: int):
    """(nfe, best seconds, compile seconds) of one row; x_init: bos (id 0) then masks."""
    x = jnp.full((batch, length), net.mask_id, jnp.int32).at[:, 0].set(0)
    params = net.params
    t0 = time.time()
    fn = jax.jit(make_run(entry, net, length)).lower(params, jax.random.key(0), x).compile()
    compile_s = time.time() - t0
    best = float("inf")
    for i in range(repeats):
        t0 = time.time()
        out = fn(params, jax.random.key(i), x)
        out.tokens.block_until_ready()
        best = min(best, time.time() - t0)
    return int(out.nfe), best, compile_s


def header(args) -> str:
    weights = f"trained DiT of {args.workdir}" if args.workdir else "random weights"
    return (
        f"{machine.describe()}; size {args.size}, vocab {args.vocab}, best of {args.repeats}, {weights}"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", default="tiny", help="model preset: tiny (quickstart) | small | medium | 1b"
    )
    parser.add_argument(
        "--vocab", type=int, default=70, help="vocabulary incl. the mask id (quickstart char: ~70)"
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--only", default="", help="comma-separated substrings of row labels to run ('' = all; the AR baseline row always runs)"
    )
    parser.add_argument(
        "--budget_s", type=float, default=0, help="skip rows once this much time is spent (0 = off)"
    )
    parser.add_argument(
        "--device-suite", action="store_true", help="small, GPT-2 vocab, the grid, < 8 minutes"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny network, L 32 and 64, batch 1 and 2, once"
    )
    parser.add_argument(
        "--workdir",
        default="",
        help="a run whose trained DiT (latest checkpoint) the masked-diffusion rows use; sets --size/--vocab",
    )
    args = parser.parse_args()
    if args.device_suite:
        # The long sequences first: if the time budget runs out, the short ones lose their rows (AR stays).
        args.size, args.vocab, args.repeats, args.budget_s = "small", 50258, 2, 400.0
        args.lengths = "1024,256"
    if args.dry_run:
        args.size, args.batches, args.lengths, args.repeats = "tiny", "1,2", "32,64", 1
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    # The first row (AR with its cache) is the baseline of every ratio: always measured.
    entries = [
        e for e in ENTRIES if e is ENTRIES[0] or not args.only or any(s in e.label for s in args.only.split(","))
    ]
    if entries[0] is not ENTRIES[0]:
        entries.insert(0, ENTRIES[0])  # the baseline is always measured
    trained, size = None, args.size
    if args.workdir:
        trained, run_config = load_network(args.workdir)
        size, args.vocab = run_config.model, trained.vocab
        args.size = f"{run_config.model.num_layers}x{run_config.model.d_model} (from --workdir)"
    print(header(args), flush=True)

    networks = {
        kind: trained if (trained and kind == "dit") else build_network(kind, size, args.vocab)
        for kind in {e.network for e in entries}
    }
    start = time.time()
    for length in lengths:
        for batch in batches:
            print(f"\n### batch {batch}, length {length}\n")
            print("| sampler | NFE | s / batch | tokens/s | vs AR | compile s |")
            print("|---|---|---|---|---|---|", flush=True)
            base = None
            for entry in entries:
                if args.budget_s and time.time() - start > args.budget_s and entry is not entries[0]:
                    print(f"| {entry.label} | skipped: --budget_s={args.budget_s:.0f} spent | | | | |")
                    continue
                nfe, seconds, compile_s = time_row(
                    entry, networks[entry.network], batch, length, args.repeats
                )
                rate = batch * length / seconds
                base = base or rate
                print(
                    f"| {entry.label} | {nfe} | {seconds:.3f} | {rate:,.0f} | {rate / base:.2f}x | {compile_s:.1f} |",
                    flush=True,
                )
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
