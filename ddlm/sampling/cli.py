"""`python -m ddlm.main --mode=sample --config=... --workdir=...`: samples from the latest checkpoint.

    run_sampling(config, workdir, load_fn=None) -> list of per-sample records

Validates config.sampler first (ddlm.sampling.config.validate: a bad field is one line, before anything is
loaded), then loads the latest checkpoint's (EMA) parameters with ddlm.checkpoints.load_for_inference, builds
denoise_fn(xt, t) = model.apply({'params': params}, xt, t) (t = None for time-free networks, loss 'radd'),
and runs the sampler named by config.sampler.name (ddlm.sampling.make_sampler) in batches of
config.sampler.batch_size, sharded over the mesh's data axes, jitted once. Each run writes to its own
folder, <config.sampler.output_dir or <workdir>/samples>/<date>-<time>-step<checkpoint>-<sampler>/, so
that no run overwrites another and a trajectory never sits beside another run's samples:

    samples.txt          the decoded samples, separated by lines of '='
    samples.jsonl        one JSON object per sample: text, tokens, nfe, time_s (batch time / batch size,
                         compilation excluded), entropy (nats, unigram entropy of its tokens), ...
    config.json          the sampler config of the run and the checkpoint step
    trajectory.html      with config.sampler.visualize: every sample's denoising trajectory (the rows where
                         a token changed), masked positions grey; on a terminal, sample 0's trajectory is
                         also played as an animation redrawn in place

Randomness: config.sampler.seed (default 0) fixes every draw, so the same command gives the same samples
(reproducible by default); pass another --config.sampler.seed for new ones.

Conditioning from the config: sampler.prompt (a prefix), sampler.infill (a template such as
'The [MASK:20] sat on the mat.'), sampler.constraints ('pos:id,...'), sampler.end (length control),
sampler.guidance_scale (classifier-free guidance with the known tokens masked as the unconditional input).

load_fn(config, workdir) -> (model, params, tokenizer, mesh or None, step) replaces the checkpoint loading
(tests; other checkpoint formats).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddlm import losses, models, paths, schedules
from ddlm.data import sft
from ddlm.eval.sample_quality import unigram_entropy
from ddlm.sampling import conditioning, make_sampler, visualize
from ddlm.sampling import config as config_lib

resolve_config = config_lib.resolve  # default_config() with the given fields set (unknown field: error)


def _load_checkpoint(config, workdir):
    from ddlm import checkpoints

    loaded = checkpoints.load_for_inference(workdir, config, ema=bool(config.sampler.use_ema))
    return loaded.model, loaded.params, loaded.tokenizer, loaded, loaded.step


class _Progress:
    """One status line on stderr: samples done, the batch, and (from the jitted loop's host callback) the
    step within the batch."""

    def __init__(self, num_samples: int, num_batches: int, steps: int, stream=None):
        self.num_samples, self.num_batches, self.steps = num_samples, num_batches, steps
        self.stream = stream or sys.stderr
        self.start = time.time()
        self.done, self.batch, self.step, self._last = 0, 0, 0, 0.0

    def _draw(self, force=False):
        now = time.time()
        if not force and now - self._last < 0.1:
            return
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        if not tty:  # a log file gets one line per batch, not a carriage-return stream per step
            if force:
                self.stream.write(
                    f"sampling: {self.done}/{self.num_samples} samples, {now - self.start:.1f}s\n"
                )
                self.stream.flush()
            return
        self._last = now
        width = 24
        filled = int(width * self.step / max(self.steps, 1))
        self.stream.write(
            f"\rsampling: {self.done}/{self.num_samples} samples, batch {min(self.batch + 1, self.num_batches)}/"
            f"{self.num_batches} [{'#' * filled}{'.' * (width - filled)}] step {self.step}/{self.steps}, "
            f"{now - self.start:.1f}s "
        )
        self.stream.flush()

    def on_step(self, k):  # called from inside the jitted loop
        self.step = int(k)
        self._draw()

    def on_batch(self, batch: int, done: int):
        self.batch, self.done, self.step = batch, done, self.steps
        self._draw(force=True)
        if done >= self.num_samples and hasattr(self.stream, "isatty") and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def run_sampling(config, workdir: str, load_fn: Callable[..., Any] | None = None) -> list[dict]:
    """Samples per config.sampler from the latest checkpoint in workdir and writes them (see module doc)."""
    sc = resolve_config(config.sampler)
    seq_len = sc.seq_len or config.train.seq_len
    # Every sampler field is checked before the (slow) checkpoint restore.
    sc = config_lib.validate(sc, diffusion=config.diffusion, seq_len=seq_len)
    # ar / bd3lm decode with the network's KV cache: only exact for a causal / block-causal network.
    needed = {"ar": "causal", "bd3lm": "block_causal"}.get(sc.name)
    if needed and models.attention_of(config.model) != needed:
        raise ValueError(
            f"config.sampler.name={sc.name!r} decodes with a KV cache and needs config.model.name="
            f"{sc.name!r}, got {config.model.name!r} (or name 'llama' with config.model.attention={needed!r}, "
            f"got {models.attention_of(config.model)!r})"
        )
    # Fast-dLLM's prefix / dual caches approximate a bidirectional network's keys/values.
    if sc.cache != "none" and config.model.name != "dit":
        raise ValueError(
            f"config.sampler.cache={sc.cache!r} caches a bidirectional network (config.model.name='dit'), got "
            f"config.model.name={config.model.name!r}: use cache='none'"
        )
    if sc.name == "bd3lm":
        if seq_len % config.model.block_size:
            raise ValueError(
                f"config.model.block_size={config.model.block_size} must divide the sample length "
                f"{seq_len} (config.sampler.seq_len, or config.train.seq_len when 0)"
            )
        if sc.window == 0 and seq_len > config.train.seq_len:  # past the training context: slide
            sc.window = config.train.seq_len - config.model.block_size
    model, params, tok, setup, ckpt_step = (load_fn or _load_checkpoint)(config, workdir)
    mask_id, vocab = tok.mask_id, tok.vocab_size
    loss = config.diffusion.loss
    graph = config.diffusion.process
    diffusion_schedule = schedules.get_schedule(
        config.diffusion.schedule, **dict(config.diffusion.schedule_kwargs)
    )
    schedule = (
        diffusion_schedule if sc.grid in ("", config.diffusion.schedule) else schedules.get_schedule(sc.grid)
    )
    time_free = loss == "radd"

    # ------------------------------------------------------------------ initial tokens (conditioning)
    prompt_ids = tok.encode(sc.prompt) if sc.prompt else []
    if sft.is_sft(config.data):  # an SFT model: rows start with bos and the templated prompt
        prompt_ids = sft.encode_prompt(tok, sc.prompt, config.data.sft_template)
    elif sc.name in ("ar", "bd3lm"):  # trained on bos doc eos: the first token is predicted from bos
        prompt_ids = [tok.bos_id] + prompt_ids
    if len(prompt_ids) > seq_len:
        raise ValueError(
            f"config.sampler.prompt is {len(prompt_ids)} tokens, longer than the sample length {seq_len} "
            f"(config.sampler.seq_len, or config.train.seq_len when 0)"
        )
    template_ids = conditioning.parse_infill_template(sc.infill, tok.encode, mask_id) if sc.infill else None
    x_init = conditioning.initial_tokens(
        sc.batch_size,
        seq_len,
        mask_id,
        prompt_ids=prompt_ids,
        template_ids=template_ids,
        constraints=conditioning.parse_constraints(
            sc.constraints, vocab_size=vocab, mask_id=mask_id, length=seq_len
        ),
        end=sc.end,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    clamp = x_init != mask_id
    if graph == "uniform":
        x_init = np.where(clamp, x_init, 0)

    # ------------------------------------------------------------------ the jitted sampler
    def network(params, xt, t):
        return model.apply({"params": params}, xt, None if time_free else t, x0=None, train=False).astype(
            jnp.float32
        )

    total_steps = int(np.sum(x_init == mask_id, axis=1).max()) if sc.name == "first_hitting" else sc.steps
    if sc.name in ("ar", "bd3lm"):  # progress by position / by block
        total_steps = seq_len - 1 if sc.name == "ar" else seq_len // config.model.block_size
    num_batches = -(-sc.num_samples // sc.batch_size)
    progress = _Progress(sc.num_samples, num_batches, total_steps)

    def sample(params, rng, x, clamp):
        denoise_fn = lambda xt, t: network(params, xt, t)
        score_fn = None
        if loss == "sedd_absorb":  # the absorbing samplers take the ratios without alpha/(1-alpha)
            score_fn = lambda xt, t: losses.sedd_absorbing_log_cond(network(params, xt, t))
        elif loss == "sedd_uniform":
            score_fn = denoise_fn  # a uniform-graph SEDD network outputs log ratios
        if not sc.name.startswith("sedd_"):
            score_fn = None
        cached = sc.name in ("ar", "bd3lm") or sc.cache != "none"
        sampler = make_sampler(
            sc,
            denoise_fn=denoise_fn,
            score_fn=score_fn,
            schedule=schedule,
            mask_id=mask_id,
            graph=graph,
            return_trajectory=bool(sc.visualize),
            progress_fn=progress.on_step if sc.progress else None,
            decoder=models.make_decoder(model, {"params": params}) if cached else None,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
        return sampler(rng, x, clamp if graph == "uniform" else None)

    mesh = getattr(setup, "mesh", None)
    x_sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        data_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        size = math.prod(mesh.shape[a] for a in data_axes)
        if sc.batch_size % size == 0:
            x_sharding = NamedSharding(mesh, PartitionSpec(data_axes))
    jitted = jax.jit(sample)
    context = setup.context() if hasattr(setup, "context") else _null_context()

    # ------------------------------------------------------------------ sample in batches
    run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-step{ckpt_step}-{sc.name}"
    base_rng = jax.random.key(sc.seed)
    records, trajectories = [], []
    x_dev = jnp.asarray(x_init) if x_sharding is None else jax.device_put(x_init, x_sharding)
    clamp_dev = jnp.asarray(clamp) if x_sharding is None else jax.device_put(clamp, x_sharding)
    logging.info(
        "Sampling %d sequences of %d tokens with %s (%d steps), checkpoint step %s.",
        sc.num_samples,
        seq_len,
        sc.name,
        sc.steps,
        ckpt_step,
    )
    with context:
        t0 = time.time()
        compiled = jitted.lower(
            params, base_rng, x_dev, clamp_dev
        ).compile()  # once: every batch has this shape
        compile_s = time.time() - t0
        logging.info("Compiled the sampler in %.1fs.", compile_s)
        progress.start = time.time()
        for b in range(num_batches):
            progress.batch, progress.step = b, 0
            t0 = time.time()
            out = compiled(params, jax.random.fold_in(base_rng, b), x_dev, clamp_dev)
            tokens = np.asarray(jax.device_get(out.tokens))
            nfe = int(out.nfe)
            batch_time = time.time() - t0
            if sc.truncate_at_eos:
                # ar / bd3lm start with bos, which is the eos of some tokenizers (GPT-2): truncate after it.
                first = 1 if sc.name in ("ar", "bd3lm") else 0
                tokens = np.concatenate(
                    [
                        tokens[:, :first],
                        conditioning.truncate_after_eos(tokens[:, first:], tok.eos_id, tok.pad_id),
                    ],
                    axis=1,
                )
            if out.trajectory is not None:
                keep = min(len(tokens), sc.num_samples - len(records))
                trajectories.append(np.asarray(jax.device_get(out.trajectory))[:, :keep])
            for row in tokens:
                if len(records) >= sc.num_samples:
                    break
                content = row[(row != tok.pad_id) & (row != mask_id)]
                records.append(
                    {
                        "index": len(records),
                        "text": tok.decode(row.tolist()),
                        "tokens": row.tolist(),
                        "nfe": nfe,
                        "time_s": batch_time / len(tokens),
                        "batch_time_s": batch_time,
                        "compile_s": compile_s,
                        "entropy": unigram_entropy(content),
                        "sampler": sc.name,
                        "steps": sc.steps,
                        "checkpoint_step": None if ckpt_step is None else int(ckpt_step),
                    }
                )
            progress.on_batch(b, len(records))

    # ------------------------------------------------------------------ outputs
    if jax.process_index() != 0:  # every process sampled its shard of the batch; process 0 writes
        return records
    out_dir = _new_run_dir(sc.output_dir or os.path.join(workdir, "samples"), run_name)
    with paths.path(out_dir, "samples.txt").open("w") as f:
        for r in records:
            f.write(r["text"] + "\n" + "=" * 80 + "\n")
    with paths.path(out_dir, "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with paths.path(out_dir, "config.json").open("w") as f:
        run_info = {
            "sampler": sc.to_dict(),
            "checkpoint_step": None if ckpt_step is None else int(ckpt_step),
            "workdir": workdir,
            "seq_len": seq_len,
            "loss": loss,
            "process": graph,
            "schedule": config.diffusion.schedule,
        }
        json.dump(run_info, f, indent=2, default=str)
    if trajectories:
        trajectory = np.concatenate(trajectories, axis=1)  # [S, num_samples, L]
        if sc.truncate_at_eos:  # the last row then equals the sample as written to samples.txt
            trajectory = np.asarray(conditioning.truncate_after_eos(trajectory, tok.eos_id, tok.pad_id))
        token_text = lambda i: tok.decode([i]) if i not in (tok.pad_id, tok.eos_id, tok.bos_id) else ""
        with paths.path(out_dir, "trajectory.html").open("w") as f:
            f.write(
                visualize.trajectory_html(
                    trajectory,
                    token_text,
                    mask_id,
                    title=_trajectory_title(sc, records, ckpt_step),
                    labels=[f"sample {r['index']} (NFE {r['nfe']})" for r in records],
                )
            )
        visualize.animate_terminal(trajectory[:, 0], token_text, mask_id)
    for r in records[:8]:
        print(f"--- sample {r['index']} (NFE {r['nfe']}, entropy {r['entropy']:.2f}) ---\n{r['text']}")
    print(
        f"{len(records)} samples written to {out_dir}/: samples.txt, samples.jsonl, config.json"
        + (", trajectory.html" if trajectories else "")
    )
    mean_entropy = float(np.mean([r["entropy"] for r in records])) if records else float("nan")
    logging.info(
        "Wrote %d samples to %s (NFE %d, mean token entropy %.3f nats).",
        len(records),
        out_dir,
        records[0]["nfe"] if records else 0,
        mean_entropy,
    )
    return records


def _new_run_dir(base: str, name: str) -> str:
    """Creates and returns base/name, or base/name-2, -3, ... if it exists: a run never writes into another's.
    `base` may be a bucket (ddlm.paths)."""
    base = paths.resolve(base)
    paths.path(base).mkdir(parents=True, exist_ok=True)
    path, n = f"{base}/{name}", 1
    while True:
        try:
            paths.path(path).mkdir()
            return path
        except FileExistsError:
            n += 1
            path = f"{base}/{name}-{n}"


def _trajectory_title(sc, records, ckpt_step) -> str:
    """'ancestral: 64 steps, NFE 64, ...' / 'first_hitting: one network call per unmasked token, NFE 122, ...'"""
    nfes = sorted({r["nfe"] for r in records})
    nfe = f"NFE {nfes[0]}" if len(nfes) == 1 else f"NFE {nfes[0]}-{nfes[-1]}"
    if sc.name == "first_hitting":
        how = "one network call per unmasked token"
    else:
        how = f"{sc.steps} steps"
    return f"{sc.name}: {how}, {nfe} (network calls), checkpoint step {ckpt_step}"


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
