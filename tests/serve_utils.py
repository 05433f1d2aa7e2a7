"""Helpers of the server tests: tiny random checkpoints saved as workdirs, and a real server on a free port.

workdir = tiny_workdir(path, loss='mdlm' | 'ar' | 'bd3lm', sft_template='')
with running(engine, api_key=None, max_queue=64) as server:   # server.url, server.scheduler, server.app
    ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SEQ_LEN = 16
# 5x faster CPU compiles of tiny programs (as ddlm.sampling.jit_sampler's tests).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(loss: str = "mdlm", *, sampler: str = "", sft_template: str = "", steps: int = 8):
    """A full experiment config: a 1-layer, 32-wide network, the byte tokenizer, a 16-token context."""
    from ddlm.sampling import config as sampler_config
    from ddlm.train import config_lib as cl

    name = {"mdlm": "dit", "ar": "ar", "bd3lm": "bd3lm"}[loss]
    model = cl.model_config("tiny", name=name, time_conditioning=loss != "ar")
    model.num_layers, model.d_model, model.num_heads, model.mlp_dim, model.cond_dim = 1, 32, 2, 64, 16
    model.block_size, model.dtype = 4, "float32"
    data = cl.data_config(corpus="shakespeare", tokenizer="byte")
    if sft_template:
        data.sft_data, data.sft_template = "shakespeare_replies", sft_template
    sc = sampler_config.default_config()
    sc.name = sampler or {"mdlm": "ancestral", "ar": "ar", "bd3lm": "bd3lm"}[loss]
    sc.steps = steps
    return cl.base_config(
        model=model,
        diffusion=cl.diffusion_config(loss),
        data=data,
        optim=cl.optim_config(),
        mesh=cl.mesh_config(),
        train=cl.train_config(steps=1, batch_size=8, seq_len=SEQ_LEN),
        sampler=sc,
    )


def tiny_workdir(workdir, loss: str = "mdlm", *, seed: int = 0, **config_fields) -> str:
    """Saves random (nowhere zero) parameters of tiny_config(loss) as a parameters-only checkpoint with its
    config, as ddlm.convert writes one: what ddlm.loading.load_for_inference reads. Returns the workdir."""
    from ddlm import checkpoints, models, sharding
    from ddlm.data import tokenizers

    config = tiny_config(loss, **config_fields)
    tok = tokenizers.get_tokenizer(config.data)
    model = models.get_model(config.model, tok.vocab_size)
    inputs = sharding.model_init_inputs(config.diffusion.loss, 1, SEQ_LEN)
    boxed, _ = sharding.abstract_params(model, inputs)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1 or "bias" in name:
            value = (1.0 if "scale" in name else 0.0) + 0.3 * rng.standard_normal(leaf.shape)
        else:
            fan_in = leaf.shape[0] * (leaf.shape[1] if "out_kernel" in name else 1)
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(boxed))
    meta = checkpoints.params_only_metadata(config, tok)
    directory = os.path.join(str(workdir), checkpoints.CHECKPOINTS_DIR)
    with checkpoints.Checkpointer(directory, keep=1, async_save=False) as checkpointer:
        checkpointer.save(0, {"params": params, "step": jnp.zeros((), jnp.int32)}, metadata=meta, force=True)
    return str(workdir)


def tiny_engine(workdir, **kwargs):
    """An Engine over the workdir's checkpoint on one device, with fast compiles."""
    from ddlm import loading
    from ddlm.serve import engine as engine_lib

    loaded = loading.load_for_inference(str(workdir), devices=jax.devices()[:1])
    kwargs.setdefault("batch_sizes", (1, 4))
    return engine_lib.Engine(loaded, compiler_options=FAST_COMPILE, **kwargs)


@dataclasses.dataclass
class Server:
    url: str
    app: object
    scheduler: object


@contextlib.contextmanager
def running(
    engine,
    *,
    api_key=None,
    max_queue=64,
    max_n=None,
    model_name="tiny",
    request_timeout=120.0,
    scheduler=None,
):
    """A uvicorn server of create_app(engine) on a free port of 127.0.0.1, in a thread of this process (so that a
    test can pause the scheduler); stopped on exit. A given `scheduler` is shared (and not stopped here)."""
    import uvicorn

    from ddlm.serve import app as app_lib
    from ddlm.serve import scheduler as scheduler_lib
    from ddlm.serve import schemas

    own = scheduler is None
    if own:
        scheduler = scheduler_lib.Scheduler(engine, max_queue=max_queue, max_wait_s=0.005)
        scheduler.start()
    max_n = min(4, engine.max_batch) if max_n is None else max_n
    limits = schemas.Limits(max_n=max_n, max_prompt_tokens=engine.seq_len - 1, max_timeout=request_timeout)
    app = app_lib.create_app(
        engine,
        scheduler,
        model_name=model_name,
        api_key=api_key,
        limits=limits,
        request_timeout=request_timeout,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", app, scheduler)
    finally:
        server.should_exit = True
        thread.join(30)
        if own:
            scheduler.stop()


def wait_until(predicate, timeout: float = 60.0, what: str = "a condition"):
    """Polls predicate() until it is true (the outcome never depends on timing; only how long it takes)."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
