"""AR-to-diffusion adaptation (ddlm/train/adapt.py): DiffuLLaMA's annealed attention mask (its schedule and
distribution), a diffusion run started from an AR checkpoint by config.train.init_from through the trainer
(the parameters it starts from are the checkpoint's; at the first annealing step the network is the AR network
with its head shifted; after annealing it is the bidirectional eval network), and the one-line errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import checkpoints, loading, losses, schedules
from ddlm.models import layers
from ddlm.sharding import ConfigError
from ddlm.train import adapt, trainer
import model_utils

FAST = {"xla_backend_optimization_level": 0}


def _config(name, arg="smoke"):
    return model_utils.experiment_config(name, arg)


def test_anneal_ratio_and_mask():
    """ratio = min(1, (step + 1) / anneal_steps); the mask is causal OR Bernoulli(ratio) per entry."""
    np.testing.assert_allclose([adapt.anneal_ratio(s, 4) for s in (0, 1, 3, 10)], [0.25, 0.5, 1.0, 1.0])
    length = 64
    causal = np.tril(np.ones((length, length), bool))
    assert np.array_equal(layers.annealed_causal_mask(jax.random.key(0), length, 0.0), causal)
    assert np.all(layers.annealed_causal_mask(jax.random.key(0), length, 1.0))
    mask = np.asarray(adapt.annealed_attention_mask(jax.random.key(1), 1, length, 8))  # ratio 0.25
    assert np.all(mask[causal])
    future = mask[~causal]  # 2016 Bernoulli(0.25) draws: mean within 5 standard errors
    assert abs(future.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / future.size)
    assert not np.array_equal(
        mask, np.asarray(adapt.annealed_attention_mask(jax.random.key(2), 1, length, 8))
    )


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
    """A checkpoint of the AR quickstart at the smoke size (1 layer, 32 wide), as the trainer writes it: the
    initial state of its own seed (training it would only cost compile time here)."""
    workdir = str(tmp_path_factory.mktemp("quickstart_ar"))
    config = _config("quickstart_ar")
    config.train.seed = 7  # not the adapted run's seed: its own initialisation differs from this checkpoint
    setup = trainer.build(config, jax.devices()[:1])
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), async_save=False) as ck:
        ck.save(1, setup.init_state(), metadata=checkpoints.checkpoint_metadata(config, setup.tokenizer))
    return workdir


def test_diffullama_adaptation_starts_from_the_ar_parameters_and_anneals(ar_workdir, tmp_path, caplog):
    config = _config("adapt_diffullama", "smoke,anneal_steps=1000000")
    config.train.init_from = ar_workdir
    setup = trainer.build(config, jax.devices()[:1])
    params = adapt.load_init_params(ar_workdir, setup.abstract_state().params, setup.tokenizer)
    ar = loading.load_for_inference(ar_workdir, devices=jax.devices()[:1])  # its EMA parameters
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ar.params), strict=True):
        np.testing.assert_array_equal(a, b)

    # Step 0 of a 1e6-step annealing: the mask is causal, so the diffusion loss is the MDLM loss of the AR
    # network's logits moved one position right (its next-token head reused), computed here independently.
    tok = setup.tokenizer
    batch = {
        "tokens": jax.random.randint(jax.random.key(3), (8, 16), 3, tok.mask_id),
        "loss_mask": jnp.ones((8, 16), jnp.float32),
    }
    rng = jax.random.key_data(jax.random.key(4))
    # Parameters moved off the 2-step checkpoint (whose zero-initialised output layer is still nearly flat),
    # so that the attention pattern shows in the loss.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    # Jitted without LLVM's optimisations: a tiny program compiles ~5x faster, and eager flax is slower still.
    loss_at = jax.jit(
        lambda p, step: setup.loss_fn(p, batch, rng, False, step=step)[0], compiler_options=FAST
    )
    eval_loss = float(
        jax.jit(lambda p: setup.loss_fn(p, batch, rng, False)[0], compiler_options=FAST)(params)
    )
    loss_at_start = loss_at(params, 0)

    def shifted_ar(xt, t, x0_context):
        logits = ar.model.apply({"params": params}, xt, None)
        return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)

    expected = jax.jit(
        lambda: losses.training_loss(
            "mdlm",
            shifted_ar,
            batch["tokens"],
            batch["loss_mask"],
            jax.random.split(rng)[1],
            schedule=schedules.get_schedule("loglinear", eps=1e-3),
            vocab_size=tok.vocab_size,
            mask_id=tok.mask_id,
        )[0],
        compiler_options=FAST,
    )()
    np.testing.assert_allclose(loss_at_start, expected, rtol=1e-5)
    # Once annealed, the training network is the bidirectional one that eval and the samplers use.
    np.testing.assert_allclose(loss_at(params, config.adapt.anneal_steps), eval_loss, rtol=1e-6)
    assert abs(float(loss_at_start) - eval_loss) > 1e-3

    # Through the trainer: 2 annealed steps from the AR checkpoint, in a new workdir.
    config.adapt.anneal_steps = 2
    caplog.set_level("INFO")
    adapted = str(tmp_path / "adapted")
    metrics = trainer.train_and_evaluate(config, adapted, devices=jax.devices()[:1])
    assert np.isfinite(metrics["nelbo"])
    assert f"Initialised the parameters from {ar_workdir}" in caplog.text
    # Two Adam steps of lr <= 2e-3 move each parameter by ~4e-3 at most from where they started: the AR
    # checkpoint's (a fresh initialisation differs from it by ~0.02 and more).
    trained = loading.load_for_inference(adapted, devices=jax.devices()[:1], ema=False).params
    moved = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(ar.params))
    )
    assert moved < 0.01, moved


def test_adaptation_errors_are_one_line_naming_the_field(ar_workdir, tmp_path):
    config = _config("adapt_fastdllm_v2")
    config.adapt.anneal_steps = 10  # a block-causal network has no causal attention to anneal
    with pytest.raises(ConfigError, match="config.adapt.anneal_steps=10 .* needs a bidirectional network"):
        trainer.validate_config(config, 1)
    config = _config("adapt_diffullama")
    config.model.d_model = 64  # not the AR checkpoint's width
    setup = trainer.build(config, jax.devices()[:1])
    with pytest.raises(
        ConfigError, match=r"config.train.init_from=.* does not fit.*params/block_0/.*shape"
    ) as e:
        adapt.load_init_params(ar_workdir, setup.abstract_state().params, setup.tokenizer)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="has no checkpoint"):
        adapt.load_init_params(str(tmp_path), setup.abstract_state().params, setup.tokenizer)
