"""ddlm/train/step.py: the compiled train step against the plain formulas (AdamW with clipping, EMA with
warm start), a skipped non-finite step leaving the whole state bitwise unchanged, and the update written in
place (no copy of a state buffer in the compiled program)."""

import os
import re

import jax
import numpy as np
import pytest

from ddlm.train import config_lib, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(REPO, "experiments", "quickstart.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.model.num_layers, config.model.d_model, config.model.num_heads, config.model.mlp_dim = 1, 32, 2, 64
    config.train.batch_size, config.train.seq_len = 8, 16
    config.optim.lr, config.optim.warmup_steps, config.optim.ema_decay = 3e-3, 0, 0.9
    config.optim.grad_clip = 0.05  # small: the clipping is active
    config.mesh = config_lib.mesh_config(data=1)
    return config


@pytest.fixture(scope="module")
def compiled_step():
    setup = trainer.build(_config(), jax.devices()[:1])
    return setup, trainer.compile_train_step(setup)


def _batch(setup, seed, nan=False):
    cfg = setup.config.train
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, setup.tokenizer.mask_id, (cfg.batch_size, cfg.seq_len)).astype(np.int32)
    mask = np.ones((cfg.batch_size, cfg.seq_len), np.float32)
    if nan:
        mask[0, 0] = np.nan
    return jax.device_put({"tokens": tokens, "loss_mask": mask}, setup.batch_sharding)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)  # the compiled step donates its input state


def test_step_matches_adamw_clipping_and_ema_formulas(compiled_step):
    """Two steps of the compiled step vs. the update written out: clip g by c / max(|g|, c), Adam moments,
    bias-corrected direction, params -= lr * direction; EMA e = d e + (1 - d) p with d = min(0.9, (1+n)/(10+n))
    (tolerance 1e-5 relative + 1e-6 absolute: Adam divides tiny gradients by their own scale, so float32
    reduction order shows in the last digits of an update of size lr = 3e-3)."""
    setup, step = compiled_step
    cfg = setup.config.optim
    state = setup.init_state()
    ref = jax.device_get(state)
    mu = jax.tree.map(np.zeros_like, ref.params)
    nu = jax.tree.map(np.zeros_like, ref.params)
    params, ema = ref.params, ref.ema_params
    grad_fn = jax.jit(jax.grad(lambda p, b, r: setup.loss_fn(p, b, r, True)[0]))
    for n in range(2):
        batch = _batch(setup, n)
        with setup.context():
            grads = jax.device_get(grad_fn(params, batch, jax.random.fold_in(state.rng, n)))
        g_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
        scale = cfg.grad_clip / max(g_norm, cfg.grad_clip)
        lr = float(setup.lr_schedule(n))
        mu = jax.tree.map(lambda m, g: cfg.b1 * m + (1 - cfg.b1) * g * scale, mu, grads)
        nu = jax.tree.map(lambda v, g: cfg.b2 * v + (1 - cfg.b2) * (g * scale) ** 2, nu, grads)
        direction = jax.tree.map(
            lambda m, v: (m / (1 - cfg.b1 ** (n + 1))) / (np.sqrt(v / (1 - cfg.b2 ** (n + 1))) + cfg.eps),
            mu,
            nu,
        )
        params = jax.tree.map(lambda p, d: p - lr * d, params, direction)  # weight_decay is 0 here
        decay = min(cfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)

        state, metrics = step(state, batch)
        assert float(metrics["finite"]) == 1.0
        np.testing.assert_allclose(float(metrics["grad_norm"]), g_norm, rtol=1e-5)
    assert int(state.step) == 2
    for name, want, got in (("params", params, state.params), ("ema", ema, state.ema_params)):
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(got))):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
    adam = state.opt_state[1][0]  # chain(clip, adamw(...)): adamw = chain(scale_by_adam, ...)
    for w, g in zip(jax.tree.leaves(mu), jax.tree.leaves(jax.device_get(adam.mu))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)


def test_non_finite_step_keeps_the_whole_state(compiled_step):
    """NaN in the loss: params, optimizer state and EMA come back bitwise as they were, step advances,
    the norms of the (not made) update are NaN."""
    setup, step = compiled_step
    state, _ = step(setup.init_state(), _batch(setup, 0))  # a non-trivial state (moments, EMA != params)
    before = jax.device_get(state)
    after, metrics = step(_copy(state), _batch(setup, 1, nan=True))
    assert float(metrics["finite"]) == 0.0 and int(after.step) == int(before.step) + 1
    assert np.isnan(float(metrics["update_norm"])) and np.isnan(float(metrics["param_norm"]))
    for name in ("params", "opt_state", "ema_params"):
        for a, b in zip(
            jax.tree.leaves(getattr(before, name)), jax.tree.leaves(jax.device_get(getattr(after, name)))
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
    after, metrics = step(after, _batch(setup, 2))  # and the next good step updates again
    assert float(metrics["finite"]) == 1.0 and float(metrics["update_norm"]) > 0


def test_compiled_step_updates_the_state_in_place(compiled_step):
    """The donated state is updated in place: the compiled program copies none of the state's parameter,
    moment or EMA buffers (a copy is a full extra read and write of the state every step)."""
    setup, step = compiled_step
    hlo = step.as_text()
    copied = re.findall(r"= \S+ copy\(%?(state_[\w.]+)\)", hlo)
    big = [name for name in copied if not name.startswith(("state_step", "state_rng"))]
    assert not big, f"{len(big)} state buffers copied, e.g. {big[:3]}"
    # the check can see copies: the parameters' HLO names are what it looks for
    assert re.search(r"%?state_params\w*", hlo)
