"""ddlm/train/optim.py: the fused AdamW update (`FusedAdamW.apply`, what the train step runs) against optax's
chain (`FusedAdamW.update`: clip_by_global_norm, scale_by_adam, masked decayed weights, the schedule), leaf
by leaf over several steps, and the whole compiled train step with either path: the same losses, gradient
norms, parameters, moments and EMA within float32 rounding (the fused update multiplies by reciprocals of
scalars where optax divides by them: the last bits differ)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddlm.train import config_lib, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "bias": jnp.zeros((5,), jnp.float32)},
        "attn": jnp.asarray(rng.normal(size=(4, 3, 2, 2)), jnp.float32),
        "scale": jnp.ones((6,), jnp.float32),
    }


@pytest.mark.parametrize("grad_clip", [0.0, 0.5, 100.0])  # off, active, inactive
def test_fused_apply_matches_the_optax_chain(grad_clip):
    """Six steps along optax's trajectory, each from the same (gradients, state, parameters) through apply and
    through tx.update + apply_updates: the new parameters, moments and counts (rtol 1e-6, atol 1e-9), the
    update norm (rtol 1e-5); weight decay on the matrices only, a warmup schedule."""
    schedule = optax.linear_schedule(0.0, 1e-2, 3)
    tx = optim.fused_adamw(schedule, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=grad_clip)
    params = _params(0)
    state = tx.init(params)
    apply, update = jax.jit(tx.apply), jax.jit(tx.update)
    for n in range(6):
        grads = jax.tree.map(lambda p, k=n: jnp.sin(3.0 * p + k) * (1.0 + k), params)
        got_params, got_state, update_norm = apply(grads, optax.tree.norm(grads), state, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(update_norm, optax.tree.norm(updates), rtol=1e-5)
        assert jax.tree.structure(got_state) == jax.tree.structure(state)
        for got, want in zip(jax.tree.leaves((got_params, got_state)), jax.tree.leaves((params, state))):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert int(got_state[-1][0].count) == 6 and int(got_state[-1][2].count) == 6


def test_fused_apply_decays_matrices_only():
    """With zero gradients Adam's direction is 0, so the update is -lr * weight_decay * p on matrices (ndim > 1)
    and nothing on vectors."""
    tx = optim.fused_adamw(optax.constant_schedule(0.1), b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, grad_clip=1.0)
    params = _params(1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _, _ = tx.apply(zeros, jnp.float32(0.0), tx.init(params), params)
    np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.05), rtol=1e-6)
    np.testing.assert_allclose(new["attn"], params["attn"] * (1 - 0.05), rtol=1e-6)
    np.testing.assert_array_equal(new["scale"], params["scale"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mdlm", os.path.join(REPO, "experiments", "mdlm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.data.corpus = "shakespeare"
    config.model.num_layers, config.model.d_model, config.model.num_heads, config.model.mlp_dim = 2, 32, 2, 64
    config.model.dropout = 0.0
    config.train.batch_size, config.train.seq_len = 4, 16
    config.optim.lr, config.optim.warmup_steps, config.optim.ema_decay = 3e-3, 2, 0.9
    config.optim.weight_decay, config.optim.grad_clip = 0.01, 0.05  # both active
    config.mesh = config_lib.mesh_config(data=1)
    config.optim.fused_update = True
    return config


def test_train_step_with_the_fused_update_matches_the_optax_step():
    """Four steps of the train step with the fused update and with optax's (tx.init/tx.update as a plain
    GradientTransformation): the same losses and gradient norms (rtol 1e-5), parameters, optimizer state and
    EMA after each step (rtol 1e-5, atol 1e-7), and the same update and parameter norms (rtol 1e-4)."""
    from ddlm.train import step as step_lib
    from ddlm.train import trainer

    setup = trainer.build(_config(), jax.devices()[:1])
    plain = optax.GradientTransformation(setup.tx.init, setup.tx.update)
    assert isinstance(setup.tx, optim.FusedAdamW)

    def step_fn(tx):
        def stepped(state, batch):
            return step_lib.train_step(
                state, batch, jax.random.fold_in(state.rng, state.step), loss_fn=setup.loss_fn, tx=tx,
                lr_schedule=setup.lr_schedule, accum_steps=1, ema_decay=setup.config.optim.ema_decay,
            )

        return jax.jit(stepped)

    fused_step, optax_step = step_fn(setup.tx), step_fn(plain)
    fused = optaxed = setup.init_state()
    rng = np.random.default_rng(0)
    cfg = setup.config.train
    with setup.context():
        for _ in range(4):
            tokens = rng.integers(0, setup.tokenizer.mask_id, (cfg.batch_size, cfg.seq_len)).astype(np.int32)
            batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
            fused, m_fused = fused_step(fused, batch)
            optaxed, m_optax = optax_step(optaxed, batch)
            assert float(m_fused["finite"]) == 1.0
            for key in ("loss", "grad_norm"):
                np.testing.assert_allclose(m_fused[key], m_optax[key], rtol=1e-5, err_msg=key)
            for key in ("update_norm", "param_norm", "learning_rate"):
                np.testing.assert_allclose(m_fused[key], m_optax[key], rtol=1e-4, err_msg=key)
            for name in ("params", "opt_state", "ema_params"):
                for got, want in zip(jax.tree.leaves(getattr(fused, name)), jax.tree.leaves(getattr(optaxed, name))):
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert int(fused.step) == 4


def test_fused_update_compiles_to_fewer_fusions_than_optax():
    """The point of the fused update: XLA writes out fewer intermediate arrays. The compiled train step (one
    device) with it has at least two fusions fewer per parameter array than with optax's chain (the clipped
    gradient and the scaled update are no longer written out; measured: 7 -> 5 elementwise passes each)."""
    import re

    from ddlm.train import step as step_lib
    from ddlm.train import trainer

    setup = trainer.build(_config(), jax.devices()[:1])
    plain = optax.GradientTransformation(setup.tx.init, setup.tx.update)
    cfg = setup.config.train
    batch = {
        "tokens": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.float32),
    }

    def fusions(tx):
        def stepped(state, batch):
            return step_lib.train_step(
                state, batch, jax.random.fold_in(state.rng, state.step), loss_fn=setup.loss_fn, tx=tx,
                lr_schedule=setup.lr_schedule, accum_steps=1, ema_decay=setup.config.optim.ema_decay,
            )

        with setup.context():
            hlo = jax.jit(stepped).lower(setup.abstract_state(), batch).compile().as_text()
        return len(re.findall(r" fusion\(", hlo))

    leaves = len(jax.tree.leaves(setup.abstract_state().params))
    fused, optaxed = fusions(setup.tx), fusions(plain)
    assert fused <= optaxed - 2 * leaves, (fused, optaxed, leaves)


def test_the_fused_update_is_the_default_and_optax_an_option():
    """config.optim.fused_update: on (the default), a FusedAdamW whose apply the step runs; off, and in a
    config stored before the field existed, optax's chain (the train step applies it as optax does). A
    non-bool is one ConfigError naming the field."""
    from ddlm.sharding import ConfigError
    from ddlm.train import validation

    o = config_lib.optim_config()
    assert o.fused_update is True
    assert isinstance(optim.make_optimizer(o, 10), optim.FusedAdamW)
    o.fused_update = False
    assert not isinstance(optim.make_optimizer(o, 10), optim.FusedAdamW)
    stored = type(o)({k: v for k, v in o.to_dict().items() if k != "fused_update"})
    assert not isinstance(optim.make_optimizer(stored, 10), optim.FusedAdamW)
    o = type(o)({**o.to_dict(), "fused_update": "yes"})  # as a config file could write it
    with pytest.raises(ConfigError, match="optim.fused_update must be True or False") as e:
        validation.validate_optim_config(o)
    assert "\n" not in str(e.value)
