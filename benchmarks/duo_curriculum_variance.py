"""Does DUO's Gaussian-relaxation curriculum lower the variance of the training gradient? (issue 23)

DUO (Sahoo et al. 2025, sec. 4.1) trains its first half with the network fed softmax(w_t / tau) of the Gaussian
latent instead of its argmax x_t, and motivates it by a lower-variance signal. This measures it on one network and
one data batch: the gradient of the training loss (ddlm.train.step.make_loss_fn, the trainer's own loss) is drawn
--draws times with fresh diffusion noise (time, corruption) and the same data, once with the curriculum active
(step 0) and once with the plain NELBO (step >= curriculum.end). Printed for each: the loss's mean and standard
deviation over draws, the gradient's total variance E||g - E g||^2, the squared norm of its mean ||E g||^2 and their
ratio (noise to signal: the number of draws a mean needs to point the right way; lower is better). The two
estimators target different losses (the relaxed one and the NELBO), so the ratio, not the raw variance, compares
them.

    python benchmarks/duo_curriculum_variance.py                       # runs/few_step/duo's EMA network and random init
    python benchmarks/duo_curriculum_variance.py --workdir=<a DUO run> --draws=128
    python benchmarks/duo_curriculum_variance.py --dry-run             # smoke sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import machine  # benchmarks/machine.py


def gradient_statistics(grads: np.ndarray, losses: np.ndarray) -> dict:
    """grads [draws, P] (flattened gradients), losses [draws] -> the loss's mean/std and the gradient's total
    variance, squared mean norm and noise-to-signal ratio (unbiased variance: ddof = 1)."""
    mean = grads.mean(axis=0)
    variance = float(((grads - mean) ** 2).sum(axis=1).sum() / (len(grads) - 1))
    signal = float((mean**2).sum())
    return {"loss": float(losses.mean()), "loss_std": float(losses.std(ddof=1)), "grad_variance": variance,
            "grad_mean_sq": signal, "noise_to_signal": variance / signal}  # fmt: skip


def measure(config, params, model, x0, draws: int, seed: int = 0) -> dict:
    """{'curriculum': stats, 'plain': stats} for the config's DUO loss at params on the batch x0."""
    from jax.flatten_util import ravel_pytree

    from ddlm.data import tokenizers
    from ddlm.train import step as step_lib

    tok = tokenizers.get_tokenizer(config.data)
    loss_fn = step_lib.make_loss_fn(model, config.diffusion, config.model, vocab_size=tok.vocab_size, mask_id=tok.mask_id)
    batch = {"tokens": jnp.asarray(x0), "loss_mask": jnp.ones(x0.shape, jnp.float32)}
    end = int(config.diffusion.curriculum.end)

    @jax.jit
    def one(rng, step):
        (loss, _), g = jax.value_and_grad(lambda p: loss_fn(p, batch, rng, False, step), has_aux=True)(params)
        return loss, ravel_pytree(g)[0]

    out = {}
    for name, step in (("curriculum", 0), ("plain", end)):
        ls, gs = [], []
        for i in range(draws):
            loss, g = one(jax.random.key(seed + i), jnp.asarray(step, jnp.int32))
            ls.append(float(loss))
            gs.append(np.asarray(g, np.float64))
        out[name] = gradient_statistics(np.stack(gs), np.asarray(ls))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/few_step/duo", help="a DUO run (its EMA network); '' = none")
    parser.add_argument("--config", default="experiments/few_step.py:model=duo", help="the recipe (random init)")
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dry-run", dest="dry_run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.config, args.workdir, args.draws, args.batch = args.config + ",smoke", "", 4, 4
    import flax.linen as nn

    from ddlm import loading, models
    from ddlm.data import tokenizers
    from ddlm.eval import cli as eval_cli

    config = eval_cli.load_config_file(args.config)
    if not config.diffusion.curriculum.end:
        sys.exit(f"duo_curriculum_variance: {args.config} has no curriculum (config.diffusion.curriculum.end = 0)")
    tok = tokenizers.get_tokenizer(config.data)
    x0 = np.asarray(eval_cli.validation_rows(config, tok, args.batch), np.int32)
    model = models.get_model(config.model, tok.vocab_size)
    t = jnp.zeros((1,)) if config.model.get("time_conditioning", False) else None
    init = dict(nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), t))["params"])
    networks = [("random init", config, init, model)]
    if args.workdir:
        loaded = loading.load_for_inference(args.workdir, devices=jax.devices()[:1])
        trained = loaded.config
        trained.diffusion.curriculum.end = trained.diffusion.curriculum.end or config.diffusion.curriculum.end
        networks.append((f"{args.workdir} step {loaded.step} (EMA)", trained, loaded.params, loaded.model))
    print(f"{machine.describe()}; {args.draws} draws of the diffusion noise on one batch of {args.batch} x "
          f"{x0.shape[1]} validation tokens; {args.config}")  # fmt: skip
    print("| network | estimator | loss mean ± std | E||g - Eg||^2 | ||Eg||^2 | noise / signal |")
    print("|---|---|---|---|---|---|")
    for label, cfg, params, mdl in networks:
        stats = measure(cfg, params, mdl, x0, args.draws)
        for name, s in stats.items():
            print(f"| {label} | {name} | {s['loss']:.4f} ± {s['loss_std']:.4f} | {s['grad_variance']:.4g} | "
                  f"{s['grad_mean_sq']:.4g} | {s['noise_to_signal']:.3g} |", flush=True)  # fmt: skip
        ratio = stats["curriculum"]["noise_to_signal"] / stats["plain"]["noise_to_signal"]
        print(f"  {label}: the curriculum's noise-to-signal is {ratio:.3g}x the plain NELBO's")


if __name__ == "__main__":
    main()
