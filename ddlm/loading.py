"""The loader sampling/, eval/ and the trainer's evaluation use: the newest usable checkpoint of a workdir as
a network and its parameters.

    load_for_inference(workdir, config=None, ema=True) -> Loaded(config, tokenizer, model, params, step, mesh)

It sits above ddlm.checkpoints (which stores and checks checkpoints and knows no network) and ddlm.models,
and below sampling/ and eval/, so none of them calls up the layers or into the trainer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from ddlm import checkpoints, models, sharding
from ddlm.data import tokenizers
from ddlm.sharding import ConfigError


@dataclasses.dataclass
class Loaded:
    """What sampling and evaluation need from a checkpoint."""

    config: ml_collections.ConfigDict  # the config the network was built from
    tokenizer: Any
    model: Any  # flax.linen Module
    params: Any  # parameter tree (EMA or raw), sharded over `mesh`
    step: int
    mesh: jax.sharding.Mesh

    def context(self):
        """Mesh and logical-axis rules in scope while tracing the network."""
        return sharding.mesh_context(self.mesh)


def load_for_inference(
    workdir: str, config=None, *, ema: bool = True, devices=None, step: int | None = None
) -> Loaded:
    """The newest usable checkpoint of `workdir` (or the one at `step`: an intermediate round of a distillation
    run, say) as (config, tokenizer, model, params, step, mesh).

    With `config=None` the network is rebuilt from the config stored in the checkpoint; a given config must
    be compatible with it and use the same tokenizer vocabulary (IncompatibleCheckpointError otherwise,
    naming the fields: samples would be decoded with the wrong vocabulary). Only the parameters are read
    (the EMA ones with `ema`), not the optimizer state. Creates nothing in `workdir`: a missing or empty
    checkpoint directory is a one-line CheckpointError."""
    devices = list(jax.devices() if devices is None else devices)
    directory = os.path.join(workdir, checkpoints.CHECKPOINTS_DIR)
    with checkpoints.Checkpointer(directory, read_only=True) as checkpointer:
        newest, stored = checkpointer.newest_metadata(step)
        if config is None:
            if stored is None or "config" not in stored:
                raise checkpoints.CheckpointError(
                    f"the checkpoint at step {newest} in {checkpointer.directory} stores no config "
                    "(written by an older ddlm): pass --config"
                )
            config = ml_collections.ConfigDict(stored["config"])
        tokenizer = tokenizers.get_tokenizer(config.data)
        current = {
            "compatibility": checkpoints.compatibility(config, tokenizer),
            "data": {"tokenizer_fingerprint": tokenizer.fingerprint},
        }
        if stored is not None:
            diffs = checkpoints.compatibility_differences(stored, current) + checkpoints.data_differences(
                stored, current, fields=("tokenizer_fingerprint",)
            )
            if diffs:
                raise checkpoints.IncompatibleCheckpointError(
                    f"the checkpoint at step {newest} in {checkpointer.directory} was written by an "
                    f"incompatible config: {'; '.join(diffs)}"
                )
        model = models.get_model(config.model, tokenizer.vocab_size)
        mesh = _inference_mesh(config, devices)
        init_inputs = sharding.model_init_inputs(config.diffusion.loss, 1, config.train.seq_len)
        boxed, _ = sharding.abstract_params(model, init_inputs)
        # A converted checkpoint (ddlm.convert) holds one parameter set, 'params', and no EMA.
        field = "ema_params" if ema and not (stored or {}).get("params_only") else "params"
        abstract = {
            field: sharding.sharded_abstract_params(boxed, mesh),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        restored, found = checkpointer.restore_latest(abstract, partial=True, step=step)
    if restored is None:
        which = "all corrupt" if step is None else f"the one at step {step} is corrupt"
        raise checkpoints.CheckpointError(f"no usable checkpoint in {directory} ({which})")
    return Loaded(
        config=config, tokenizer=tokenizer, model=model, params=restored[field], step=found, mesh=mesh
    )


def _inference_mesh(config, devices):
    """The config's mesh if it fits these devices, else plain data parallelism over them."""
    try:
        return sharding.make_mesh(config.mesh, devices)
    except ConfigError as e:
        logging.info("config.mesh does not fit %d devices (%s): using data parallelism.", len(devices), e)
        return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
