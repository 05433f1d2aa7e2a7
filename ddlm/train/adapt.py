"""AR-to-diffusion adaptation: start a diffusion model from an autoregressive checkpoint.

Two routes, one config each (experiments/adapt_diffullama.py, experiments/adapt_fastdllm_v2.py):

* DiffuLLaMA (Gong et al. 2025, "Scaling Diffusion Language Models via Adaptation from Autoregressive
  Models"): the AR network becomes a bidirectional masked-diffusion denoiser (loss 'mdlm', time-free) whose
  attention opens gradually, causal to bidirectional over `config.adapt.anneal_steps` steps
  (`annealed_attention_mask`), with the logit shift (config.model.logit_shift: position i is predicted by the
  output layer at i - 1, where the AR network predicted its next token, so its head is reused).
* Fast-dLLM v2 (Wu et al. 2025): the AR network becomes a block-diffusion (BD3-LM) model, block-causal
  attention at once (loss 'bd3lm', attention 'block_causal'), with the logit shift; the first token of a
  block is predicted from the clean token before it, exactly as the AR network did.

`config.train.init_from=<workdir>` (a training run of ours, or a folder written by ddlm.convert) starts
a new run from that checkpoint's parameters (its EMA ones when it has them): the optimizer state, the step and
the data position start afresh. Loading goes through ddlm.checkpoints (the structure check names any
parameter that does not fit; the tokenizer's vocabulary must be the same).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging

from ddlm import checkpoints
from ddlm.models import layers
from ddlm.sharding import ConfigError


def anneal_ratio(step, anneal_steps: int):
    """float32 []: the share of future keys visible at optimizer step `step` (0-based), DiffuLLaMA's
    min(1, (step + 1) / anneal_steps): the first step already sees 1 / anneal_steps of them."""
    return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / anneal_steps)


def annealed_attention_mask(rng, step, length: int, anneal_steps: int) -> jax.Array:
    """bool [length, length]: this step's annealed mask (`layers.annealed_causal_mask` at `anneal_ratio`)."""
    return layers.annealed_causal_mask(rng, length, anneal_ratio(step, anneal_steps))


def validate(config) -> None:
    """ConfigError naming the field: annealing needs a bidirectional network. (config.train.init_from is
    checked when it is read, before anything is compiled.)"""
    from ddlm import models

    steps = config.adapt.anneal_steps
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"config.adapt.anneal_steps must be an integer >= 0 (0 = off), got {steps!r}")
    if steps and models.attention_of(config.model) != "bidirectional":
        raise ConfigError(
            f"config.adapt.anneal_steps={steps} anneals causal to bidirectional attention: it needs a "
            f"bidirectional network, got attention {models.attention_of(config.model)!r}"
        )


def check_resumable(workdir: str) -> None:
    """ConfigError if the latest checkpoint of `workdir` holds parameters only (ddlm.convert): there
    is no optimizer state to resume; such a folder is a starting point (init_from), not a run."""
    directory = os.path.join(workdir, checkpoints.CHECKPOINTS_DIR)
    steps = checkpoints.committed_steps(directory)
    if not steps:
        return
    with checkpoints.Checkpointer(directory, read_only=True) as checkpointer:
        stored = checkpointer.read_metadata(steps[-1])
    if stored and stored.get("params_only"):
        raise ConfigError(
            f"--workdir={workdir} holds converted parameters only (no optimizer state to resume): train from "
            f"them in another --workdir with --config.train.init_from={workdir}"
        )


def load_init_params(path: str, abstract_params, tokenizer, *, field: str = "train.init_from"):
    """The parameters of the latest usable checkpoint of `path` (EMA ones if saved, else 'params'), restored
    into `abstract_params` (ShapeDtypeStructs with the target shardings). ConfigError naming
    config.<field> (the config field that named `path`) if they do not fit or the tokenizer's vocabulary
    differs."""
    path = os.path.expanduser(path)
    what = f"config.{field}={path!r}"
    if not checkpoints.committed_steps(os.path.join(path, checkpoints.CHECKPOINTS_DIR)):
        raise ConfigError(
            f"{what} has no checkpoint (expected a workdir with checkpoints/<step>, from training or from "
            "ddlm.convert)"
        )
    try:
        with checkpoints.Checkpointer(os.path.join(path, checkpoints.CHECKPOINTS_DIR), read_only=True) as ck:
            stored = ck.read_metadata(checkpoints.committed_steps(ck.directory)[-1]) or {}
            fingerprint = stored.get("data", {}).get("tokenizer_fingerprint")
            if fingerprint is not None and fingerprint != tokenizer.fingerprint:
                raise ConfigError(
                    f"{what} was trained with another tokenizer vocabulary ({fingerprint} -> "
                    f"{tokenizer.fingerprint}): use its config.data.tokenizer"
                )
            field = "params" if stored.get("params_only") else "ema_params"
            restored, step = ck.restore_latest({field: abstract_params}, partial=True)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"{what}: {e}") from None
    if restored is None:
        raise ConfigError(f"{what}: no usable checkpoint (all corrupt)")
    logging.info("Initialised the parameters from %s (%s of step %d).", path, field, step)
    return restored[field]
