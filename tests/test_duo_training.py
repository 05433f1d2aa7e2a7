"""DUO in the trainer (experiments/duo.py): the network's soft inputs, the curriculum through the train step, a
tiny quickstart run whose loss falls, the sampler CLI's score for a DUO network, and one-line config errors."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models
from ddlm.train import trainer
from ddlm.train.sharding import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUO = os.path.join(REPO, "experiments", "duo.py")


def duo_config(arg=None):
    spec = importlib.util.spec_from_file_location("duo", DUO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_transformer_soft_inputs_are_the_mean_embedding():
    """Probabilities [B, L, V] embed as sum_v p_v e_v: one-hot probabilities give the int tokens' logits, and a
    mixture gives the network on the mixed embedding (DUO's relaxed inputs); a wrong width is one line."""
    cfg = models.default_config("tiny")
    cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim, cfg.cond_dim = 1, 32, 2, 64, 16
    cfg.dtype = "float32"
    model = models.get_model(cfg, 11)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 11)
    t = jnp.array([0.3, 0.7])
    params = model.init(jax.random.PRNGKey(1), tokens, t)
    # The output layer starts at zero (adaLN-zero): perturb every parameter so that the logits see the input.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    hard = model.apply(params, tokens, t)
    soft = model.apply(params, jax.nn.one_hot(tokens, 11), t)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-5)
    other = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 11)
    mixed = model.apply(params, 0.5 * jax.nn.one_hot(tokens, 11) + 0.5 * jax.nn.one_hot(other, 11), t)
    assert float(jnp.max(jnp.abs(mixed - hard))) > 1e-3
    with pytest.raises(ValueError, match="soft tokens must be float"):
        model.apply(params, jnp.ones((2, 8, 12)) / 12, t)


def test_duo_config_errors_are_one_line():
    config = duo_config("local")
    config.diffusion.process = "absorbing"
    with pytest.raises(ConfigError, match=r"^config.diffusion.process must be 'uniform' for loss='duo'"):
        trainer.validate_config(config, 1)
    config = duo_config("local")
    config.diffusion.curriculum.gamma_min = -1.0
    with pytest.raises(ConfigError, match=r"^config.diffusion.curriculum.gamma_min must be < "):
        trainer.validate_config(config, 1)
    config = duo_config("local")
    config.diffusion.curriculum.start = config.diffusion.curriculum.end
    with pytest.raises(ConfigError, match=r"^config.diffusion.curriculum.start must be < "):
        trainer.validate_config(config, 1)
    config = duo_config("local")
    config.diffusion.loss, config.diffusion.process, config.sampler.name = "mdlm", "absorbing", "ancestral"
    with pytest.raises(ConfigError, match=r"^config.diffusion.curriculum.end must be 0 for loss='mdlm'"):
        trainer.validate_config(config, 1)


def test_duo_recipe_settings():
    """The paper's OWT run (scripts/train_owt_duo.sh): curriculum for 500k of 1M steps at tau = 1e-3, gamma in
    [-3.55, -1.85]; LM1B's gamma range; `local` keeps the curriculum for the first half of its steps."""
    full = duo_config()
    c = full.diffusion.curriculum
    assert (full.train.steps, c.start, c.end, c.tau_log10_start, c.tau_log10_end) == (1_000_000, 0, 500_000, -3, -3)
    assert (c.gamma_min, c.gamma_max, full.diffusion.process, full.train.seq_len) == (-3.55, -1.85, "uniform", 1024)
    lm1b = duo_config("corpus=lm1b").diffusion.curriculum
    assert (lm1b.gamma_min, lm1b.gamma_max) == (-3.5, -1.75)
    local = duo_config("local")
    assert local.diffusion.curriculum.end == local.train.steps // 2 and local.data.corpus == "shakespeare"
    assert duo_config("curriculum=false").diffusion.curriculum.end == 0


TINY = {
    "model.num_layers": 1, "model.d_model": 64, "model.num_heads": 2, "model.mlp_dim": 128, "model.cond_dim": 32,
    "model.dtype": "float32", "train.batch_size": 16, "train.eval_batch_size": 16, "train.seq_len": 32,
    "train.eval_batches": 2, "train.log_every": 5, "train.eval_every": 0, "train.ckpt_every": 0,
    "train.sample_at_end": True, "train.async_checkpoints": False, "sampler.steps": 16, "sampler.num_samples": 2,
    "sampler.batch_size": 2, "optim.lr": 3e-3,
}  # fmt: skip


def test_duo_quickstart_trains_its_loss_falls_and_samples(tmp_path):
    """experiments/duo.py's `local` recipe at a tiny size, 100 steps on the quickstart corpus (Shakespeare
    characters): the curriculum runs the first 50 steps (its metric says so), the plain NELBO the rest; the
    train loss falls within each phase, the final NELBO is below the uniform model's log V per character, and
    the SEDD sampler draws from the DUO network's log ratios at the end, and the canvas sampler through the CLI."""
    config = duo_config("local,steps=100")
    config.update_from_flattened_dict(TINY)
    workdir = str(tmp_path / "duo")
    metrics = trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    cur = [r["loss"] for r in train if r["step"] <= 50]
    plain = [r["loss"] for r in train if r["step"] > 55]
    assert all(r["curriculum"] == 1.0 for r in train if r["step"] <= 50)
    assert all(r["curriculum"] == 0.0 for r in train if r["step"] > 55)
    assert np.mean(cur[:3]) > np.mean(cur[-3:]) and np.mean(plain[:3]) > np.mean(plain[-3:]), (cur, plain)
    vocab = trainer.build(config, jax.devices()[:1]).tokenizer.vocab_size
    assert metrics["nelbo"] < 0.8 * np.log(vocab), (metrics, np.log(vocab))
    samples = [f for f in os.listdir(os.path.join(workdir)) if "sample" in f]
    assert samples, os.listdir(workdir)
    # The canvas sampler on the same network, two canvases of 16 (the CLI gives it the per-token times).
    from ddlm.sampling import cli

    config.sampler.name, config.sampler.canvas_length, config.sampler.progress = "canvas", 16, False
    rows = cli.run_sampling(config, workdir)
    assert len(rows) == config.sampler.num_samples and all(isinstance(r["text"], str) for r in rows), rows


def test_temperature_acts_on_a_duo_networks_x0_prediction_in_the_score_samplers():
    """On a mean-parameterised (DUO) network the sedd_* samplers apply the filters (categorical.filter_logits:
    temperature, top-k, top-p) to its x_0 logits before the log ratios (losses.duo_log_ratios; sedd_euler and
    sedd_analytic share that score function): for one key, temperature 0.5 gives the tokens of temperature 1 on
    the network's logits divided by 2 (a logits_hook: another path), and differs from temperature 1."""
    import flax.linen as nn

    from ddlm.data import tokenizers
    from ddlm.sampling import cli
    from ddlm.sampling import config as sampler_config

    config = duo_config("local")
    config.update_from_flattened_dict(TINY)
    tok = tokenizers.get_tokenizer(config.data)
    model = models.get_model(config.model, tok.vocab_size)
    x = jax.random.randint(jax.random.key(0), (4, 32), 0, tok.vocab_size - 1)
    params = nn.unbox(model.init(jax.random.key(1), x, jnp.zeros((4,))))["params"]
    params = dict(params)  # the output layer starts at zero: a random one, sharp enough that the filters matter
    params["output_kernel"] = jax.random.normal(jax.random.key(3), params["output_kernel"].shape)

    def tokens(fields, hook=None):
        sc = sampler_config.resolve(config.sampler.copy_and_resolve_references())
        sc.update({"steps": 4, "progress": False, **fields})
        sample = cli.sample_fn(config, sc, model, tok, None, logits_hook=hook)
        return np.asarray(sample(params, jax.random.key(2), x, jnp.zeros(x.shape, bool)).tokens)

    plain = tokens({"name": "sedd_analytic"})
    cold = tokens({"name": "sedd_analytic", "temperature": 0.5})
    np.testing.assert_array_equal(cold, tokens({"name": "sedd_analytic"}, hook=lambda logits, xt: logits / 0.5))
    assert (cold != plain).mean() > 0.05
