"""ddlm/train/step.py: the compiled train step against the plain formulas (AdamW with clipping, EMA with
warm start), a skipped non-finite step leaving the whole state bitwise unchanged, and the update written in
place (no copy of a state buffer in the compiled program); every metric the step reports (the loss's auxiliary
ones included, averaged over micro-batches) against an independent computation."""

import os
import re

import jax
import jax.numpy as jnp
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


def test_step_metrics_are_the_loss_functions_outputs(compiled_step):
    """Every metric of the compiled step against an independent computation: 'loss' and the loss's auxiliary
    'mask_rate' are what loss_fn gives for the step's key fold_in(rng, step) (the same masks: the draw does not
    depend on the parameters); 'learning_rate' is the schedule at the step the update was made with;
    'param_norm' and 'update_norm' are the norms of the new parameters and of new - old."""
    setup, step = compiled_step
    loss_fn = jax.jit(lambda p, b, r: setup.loss_fn(p, b, r, True))
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))
    state = setup.init_state()
    assert float(setup.lr_schedule(0)) != float(setup.lr_schedule(1))  # the step index shows in the rate
    for n in range(2):
        before = jax.device_get(state)
        batch = _batch(setup, 10 + n)
        with setup.context():
            loss, aux = jax.device_get(loss_fn(state.params, batch, jax.random.fold_in(state.rng, n)))
        state, metrics = step(state, batch)
        metrics = jax.device_get(metrics)
        assert set(metrics) == {"loss", "grad_norm", "update_norm", "param_norm", "learning_rate", "finite", "mask_rate"}
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        assert 0.0 < aux["mask_rate"] < 1.0 and metrics["mask_rate"] == aux["mask_rate"]
        np.testing.assert_allclose(metrics["learning_rate"], float(setup.lr_schedule(n)), rtol=1e-6)
        after = jax.device_get(state.params)
        np.testing.assert_allclose(metrics["param_norm"], norm(after), rtol=1e-5)
        update = jax.tree.map(lambda a, b: a.astype(np.float64) - b, after, before.params)
        np.testing.assert_allclose(metrics["update_norm"], norm(update), rtol=1e-3)


def _toy_loss_fn(params, batch, rng, train):
    """A small loss with a key-dependent part and auxiliary outputs: a scalar metric, a per-row array (not a
    metric) and a scalar named like one of the step's own metrics (which must not replace it)."""
    x = batch["tokens"].astype(jnp.float32)
    noise = jax.random.uniform(rng, ())
    per_row = (x @ params["w"] - noise - (0.0 if train else 1.0)) ** 2
    loss = jnp.sum(per_row * batch["loss_mask"][:, 0]) / x.shape[0]
    return loss, {"mask_rate": jnp.mean(x) * noise, "rows": per_row, "loss": jnp.float32(123.0)}


def _toy_state(tx, step):
    from ddlm.train.state import TrainState

    params = {"w": jnp.array([0.3, -0.2, 0.1], jnp.float32)}
    return TrainState(
        step=jnp.array(step, jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
        rng=jax.random.key_data(jax.random.key(0)),
    )


@pytest.mark.parametrize("accum_steps", [1, 2, 4])
def test_accumulated_step_averages_loss_and_metrics_over_micro_batches(accum_steps):
    """With A micro-batches (rows j, j + A, j + 2A, ... with key split(rng, A)[j]; the whole batch and rng itself
    when A = 1) 'loss', the gradient and every scalar auxiliary metric are the means over the micro-batches of
    what loss_fn gives for each; the per-row auxiliary array is no metric and the auxiliary 'loss' does not
    replace the loss. With SGD (lr 0.1) the update is -0.1 x the mean gradient, and the EMA decay at step 3 is
    min(0.9, 4/13); the learning-rate metric is the schedule at the state's step."""
    import functools

    import optax

    from ddlm.train import step as step_lib

    tx = optax.sgd(0.1)
    lr_schedule = lambda s: 0.5 / (1.0 + s)
    state = _toy_state(tx, 3)
    rng_np = np.random.default_rng(accum_steps)
    batch = {
        "tokens": jnp.asarray(rng_np.integers(0, 5, (8, 3)), jnp.int32),
        "loss_mask": jnp.asarray(rng_np.integers(0, 2, (8, 1)) * np.ones((8, 3)), jnp.float32),
    }
    rng = jax.random.PRNGKey(5)
    step = jax.jit(
        functools.partial(
            step_lib.train_step, loss_fn=_toy_loss_fn, tx=tx, lr_schedule=lr_schedule, accum_steps=accum_steps,
            ema_decay=0.9,
        )
    )
    new, metrics = jax.device_get(step(state, batch, rng))

    keys = [rng] if accum_steps == 1 else list(jax.random.split(rng, accum_steps))
    outs = [
        jax.value_and_grad(_toy_loss_fn, has_aux=True)(
            state.params, jax.tree.map(lambda x, j=j: x[j::accum_steps], batch), keys[j], True
        )
        for j in range(accum_steps)
    ]
    loss = np.mean([float(l) for (l, _), _ in outs])
    mask_rate = np.mean([float(a["mask_rate"]) for (_, a), _ in outs])
    grad = np.mean([np.asarray(g["w"]) for _, g in outs], axis=0)
    assert set(metrics) == {"loss", "grad_norm", "update_norm", "param_norm", "learning_rate", "finite", "mask_rate"}
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["mask_rate"], mask_rate, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grad), rtol=1e-6)
    want = np.asarray(state.params["w"]) - 0.1 * grad
    np.testing.assert_allclose(new.params["w"], want, rtol=1e-6)
    np.testing.assert_allclose(metrics["update_norm"], 0.1 * np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(metrics["param_norm"], np.linalg.norm(want), rtol=1e-6)
    np.testing.assert_allclose(metrics["learning_rate"], 0.5 / 4.0, rtol=1e-7)
    d = 4.0 / 13.0
    np.testing.assert_allclose(new.ema_params["w"], d * np.asarray(state.params["w"]) + (1 - d) * want, rtol=1e-6)
    assert int(new.step) == 4 and metrics["finite"] == 1.0


def test_eval_step_is_the_loss_without_dropout_as_a_token_weighted_sum():
    """eval_step: loss_sum = loss_fn(params, batch, rng, train=False) x the number of scored tokens."""
    from ddlm.train import step as step_lib

    params = {"w": jnp.array([0.3, -0.2, 0.1], jnp.float32)}
    mask = np.ones((4, 3), np.float32)
    mask[1:, 2] = 0.0
    batch = {"tokens": jnp.arange(12, dtype=jnp.int32).reshape(4, 3) % 5, "loss_mask": jnp.asarray(mask)}
    rng = jax.random.PRNGKey(1)
    out = step_lib.eval_step(params, batch, rng, loss_fn=_toy_loss_fn)
    assert set(out) == {"loss_sum", "tokens"}
    assert float(out["tokens"]) == 9.0
    np.testing.assert_allclose(out["loss_sum"], 9.0 * float(_toy_loss_fn(params, batch, rng, False)[0]), rtol=1e-6)
