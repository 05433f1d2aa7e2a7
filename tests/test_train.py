"""ddlm/train: mesh and rules, the sharded train step on 8 fake CPU devices vs one device, optimizer,
NaN policy, and every experiment config building and running 2 train steps at a reduced size."""

import functools
import glob
import importlib.util
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddlm.train import config_lib, optim, sharding, trainer
from ddlm.train.sharding import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
# Post-training recipes that build on another run's checkpoint (LoRA loads its frozen base in build; RL's
# batches are rollouts, not the data pipeline's; distillation validates its teacher's checkpoint): run end to
# end in tests/test_lora.py, test_rl_mode.py and test_distill.py.
FROM_ANOTHER_RUN = ("rl_addition", "sft_lora_quickstart", "distill_sdtt", "distill_dcd")


def load_config(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------------------------------------------ mesh


def test_mesh_resolves_data_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert one.size == 1


@pytest.mark.parametrize(
    "mesh, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "must equal the device count 8"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide the device count 8"),
        ({"data": 8, "fsdp": 0, "tensor": 1}, "config.mesh.fsdp must be a positive integer"),
    ],
)
def test_bad_mesh_is_a_config_error(mesh, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh)


def test_rules_shard_params_over_fsdp_and_tensor():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = sharding.logical_to_sharding(P("vocab", "embed"), mesh)
    assert sh.spec == P("tensor", "fsdp")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    # A dimension its axes do not divide is replicated instead of failing in jit.
    assert sharding.fit_to_shape(sh, (67, 32)).spec == P(None, "fsdp")


def test_learning_rate_schedule_warmup_then_cosine():
    cfg = config_lib.optim_config(lr=1.0, warmup_steps=10, decay="cosine")
    cfg.min_lr_ratio = 0.1
    lr = optim.learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
    assert abs(float(lr(110)) - 0.1) < 1e-6
    cfg.decay = "constant"
    assert float(optim.learning_rate_schedule(cfg, 110)(100)) == 1.0


# ------------------------------------------------------------------------------------------------ train step


def _tiny_config(**overrides):
    config = load_config(os.path.join(REPO, "experiments", "quickstart.py"), "smoke")
    config.model.num_heads, config.model.d_model, config.model.mlp_dim = 2, 32, 64
    config.train.batch_size, config.train.seq_len = 8, 16
    config.optim.lr, config.optim.warmup_steps = 3e-3, 0
    for key, value in overrides.items():
        config.update_from_flattened_dict({key: value})
    return config


def _random_batch(setup, seed=0):
    cfg = setup.config.train
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, setup.tokenizer.mask_id, (cfg.batch_size, cfg.seq_len)).astype(np.int32)
    mask = np.ones((cfg.batch_size, cfg.seq_len), np.float32)
    return {"tokens": tokens, "loss_mask": mask}


def _run_steps(config, devices, num_steps):
    setup = trainer.build(config, devices)
    step = trainer.compile_train_step(setup)
    state = setup.init_state()
    losses = []
    for i in range(num_steps):
        batch = jax.device_put(_random_batch(setup, i), setup.batch_sharding)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["finite"]) == 1.0
    return setup, state, losses, step


def test_sharded_mesh_matches_single_device():
    """Mesh (data=2, fsdp=2, tensor=2) and a 1-device mesh agree after 3 steps to float32 reduction order
    (rtol 2e-5 on the losses, atol 2e-6 on the parameters)."""
    config8 = _tiny_config()
    config8.mesh.data, config8.mesh.fsdp, config8.mesh.tensor = 2, 2, 2
    _, state8, losses8, _ = _run_steps(config8, jax.devices(), 3)
    config1 = _tiny_config()
    config1.mesh.data = 1
    setup1, state1, losses1, step1 = _run_steps(config1, jax.devices()[:1], 3)

    # Parameters and optimizer state really are sharded over fsdp / tensor.
    emb = state8.params["token_embedding"]
    assert "fsdp" in str(emb.sharding.spec), emb.sharding
    assert len({str(s.index) for s in emb.addressable_shards}) > 1
    mu = jax.tree.leaves(state8.opt_state)
    assert any("fsdp" in str(getattr(x, "sharding", None)) for x in mu)

    # A non-finite loss (NaN in the loss mask) leaves the state as it was, except for the step count.
    nan_batch = _random_batch(setup1, 9)
    nan_batch["loss_mask"][0, 0] = np.nan
    before = jax.device_get(state1.params)
    state1_copy = jax.tree.map(lambda x: x.copy(), state1)
    after, metrics = step1(state1_copy, jax.device_put(nan_batch, setup1.batch_sharding))
    assert float(metrics["finite"]) == 0.0 and int(after.step) == 4
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after.params))):
        np.testing.assert_array_equal(a, b)

    np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
    flat8 = jax.tree.leaves(jax.device_get(state8.params))
    flat1 = jax.tree.leaves(jax.device_get(state1.params))
    for a, b in zip(flat8, flat1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert int(state8.step) == int(state1.step) == 3


def test_gradient_accumulation_splits_rows_and_runs():
    from ddlm.train.step import _split_micro_batches

    x = {"tokens": jnp.arange(8)[:, None]}
    micro = _split_micro_batches(x, 2)
    assert micro["tokens"].shape == (2, 4, 1)
    assert sorted(np.asarray(micro["tokens"]).ravel().tolist()) == list(range(8))
    config = _tiny_config(**{"optim.grad_accum_steps": 2, "mesh.data": 1})
    setup = trainer.build(config, jax.devices()[:1])
    from ddlm.train import step as step_lib

    # Compiled (one small program, ~5 s) rather than op by op: the micro-batch loop made that ~50 s.
    step = jax.jit(
        functools.partial(
            step_lib.train_step,
            loss_fn=setup.loss_fn,
            tx=setup.tx,
            lr_schedule=setup.lr_schedule,
            accum_steps=2,
            ema_decay=0.99,
        )
    )
    state, metrics = step(setup.init_state(), _random_batch(setup), jax.random.key_data(jax.random.key(0)))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_nan_policy_stop_raises_and_skip_counts():
    class NoCheckpoints:
        def all_steps(self):
            return [4]

    bad = {"finite": 0.0, "loss": float("nan"), "grad_norm": float("nan")}
    skipped = []
    with pytest.raises(
        trainer.NonFiniteError, match="non-finite loss or gradients at step 5.*last good checkpoint is step 4"
    ):
        trainer._check_finite(bad, 5, "stop", NoCheckpoints(), skipped)
    trainer._check_finite(bad, 5, "skip", NoCheckpoints(), skipped)
    trainer._check_finite({**bad, "finite": 1.0}, 6, "stop", NoCheckpoints(), skipped)
    assert skipped == [5]


# ------------------------------------------------------------------------------------------------ experiments


# The network the train steps of each experiment's `local` config run on (op by op, see below); the `local` config
# itself is checked and built at its own size.
TOY_NETWORK = {
    "model.num_layers": 1,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.mlp_dim": 64,
    "model.cond_dim": 16,
    "model.num_kv_heads": 0,  # LLaMA presets with grouped-query attention: as many as the 2 heads
    "model.dtype": "float32",
}


def _check_local_scaling(name, full, local):
    """`local` keeps the recipe's method and moves every size-dependent setting together (config_lib.apply_local)."""
    strip = lambda d: {**d, "curriculum": {**d["curriculum"], "start": 0, "end": 0}}
    assert strip(local.diffusion.to_dict()) == strip(full.diffusion.to_dict()), name
    lc, fc = local.diffusion.curriculum, full.diffusion.curriculum  # DUO's: the same share of the run
    assert abs(lc.end / local.train.steps - fc.end / full.train.steps) < 1e-3 and (lc.end > 0) == (fc.end > 0)
    for key in ("name", "time_conditioning", "logit_shift", "attention", "tie_embeddings"):
        assert local.model[key] == full.model[key], (name, key)
    if full.model.name == "bd3lm":
        assert (
            local.model.block_size == full.model.block_size
            and local.train.seq_len % local.model.block_size == 0
        )
    assert local.sampler.name == full.sampler.name
    for key in ("name", "lr", "decay", "b1", "b2", "weight_decay", "grad_clip"):
        assert local.optim[key] == full.optim[key], (name, key)
    # A corpus prepared on this machine; the recipe's own data fields when it already has one, else the defaults
    # (Shakespeare characters, the 5% validation split the quickstart's prepared corpus has).
    if full.data.corpus in config_lib.LOCAL_CORPORA:
        assert local.data.to_dict() == full.data.to_dict()
    else:
        assert (
            local.data.to_dict() == config_lib.data_config(corpus="shakespeare", tokenizer="char").to_dict()
        )
    t = local.train
    assert t.eval_batch_size == t.batch_size <= 32 and t.seq_len <= 128 and t.eval_batches <= 8
    assert t.steps == min(full.train.steps, 2500) and t.sample_at_end
    if t.steps == full.train.steps:  # a recipe already at this scale keeps its own schedule
        assert (local.optim.warmup_steps, local.optim.ema_decay) == (
            full.optim.warmup_steps,
            full.optim.ema_decay,
        )
    else:
        assert (
            local.optim.warmup_steps <= t.steps // 50 and (1 - local.optim.ema_decay) * t.steps >= 25 - 1e-6
        )
        assert (
            t.log_every <= t.steps // 25
            and 0 < t.eval_every <= t.steps // 4
            and 0 < t.ckpt_every <= t.steps // 4
        )
    assert (local.mesh.data, local.mesh.fsdp, local.mesh.tensor) == (-1, 1, 1) and not local.model.remat
    assert local.sampler.steps <= t.seq_len and local.optim.grad_accum_steps == 1


@pytest.mark.parametrize(
    "path",
    [p for p in EXPERIMENTS if os.path.basename(p)[:-3] not in FROM_ANOTHER_RUN],
    ids=lambda p: os.path.basename(p)[:-3],
)
def test_experiment_local_config_builds_and_trains_on_real_batches(path):
    """Each experiment file's `local` arg (runnable on this machine in minutes): the recipe's method with every
    size-dependent setting scaled together; it validates and builds at its own size (the train state as shapes,
    jax.eval_shape: a tiny network), its validation split holds its eval batches, and its real train batches
    (the pipeline at the local batch and length) train 2 steps of the recipe's loss and optimizer on a toy-width
    network.

    The trainer's own compiled step (trainer.compile_train_step), one program per experiment: the code path a run
    takes, at about the cost of the primitives op by op (148 s for the 18 against 139 s under jax.disable_jit,
    idle); end to end in tests/test_main.py."""
    name = os.path.basename(path)[:-3]
    full, local = load_config(path), load_config(path, "local")
    assert full.diffusion.loss and full.train.steps > 2
    _check_local_scaling(name, full, local)
    if name == "quickstart":  # already at the local scale: `local` changes nothing
        assert local.to_dict() == full.to_dict()
    setup = trainer.build(local, jax.devices()[:1])
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state().params))
    assert 2e5 < n_params < 2e6, (name, n_params)  # the tiny network (the recipe's own: ~85M + embeddings)
    validation = trainer.make_iterator(
        setup, "validation", batch_size=local.train.eval_batch_size, num_epochs=1
    )
    assert sum(1 for _ in itertools.islice(validation, local.train.eval_batches)) == local.train.eval_batches

    toy = load_config(path, "local")
    toy.update_from_flattened_dict(TOY_NETWORK)
    setup = trainer.build(toy, jax.devices()[:1])
    batches = trainer.make_iterator(setup, "train", batch_size=toy.train.batch_size)
    train_step = trainer.compile_train_step(setup)  # the trainer's own step (a LoRA recipe's frozen base bound)
    state = setup.init_state()
    for _ in range(2):
        batch = next(batches)
        assert batch["tokens"].shape == (local.train.batch_size, local.train.seq_len)
        state, metrics = train_step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0, (name, metrics)
    assert int(state.step) == 2


# The paper recipes at full size: (experiment, arg, corpus, tokenizer, packing, seq_len, steps).
RECIPES = [
    ("mdlm", "", "local:data/openwebtext", "gpt2", "wrap", 1024, 1_000_000),
    ("mdlm", "corpus=lm1b", "lm1b", "wordpiece", "pad", 128, 1_000_000),
    ("mdlm", "corpus=lm1b_wrap", "lm1b", "wordpiece", "wrap", 128, 1_000_000),
    ("sedd_absorb", "", "local:data/openwebtext", "gpt2", "wrap", 1024, 1_000_000),
    ("sedd_absorb", "corpus=lm1b", "lm1b", "wordpiece", "pad", 128, 1_000_000),
    ("ar", "", "local:data/openwebtext", "gpt2", "wrap", 1024, 500_000),
    ("ar", "corpus=lm1b", "lm1b", "wordpiece", "pad", 128, 500_000),
    ("ar", "corpus=lm1b_wrap", "lm1b", "wordpiece", "wrap", 128, 1_000_000),
    ("bd3lm", "block_size=4", "local:data/openwebtext", "gpt2", "wrap", 1024, 1_000_000),
    ("bd3lm", "block_size=16,corpus=lm1b_wrap", "lm1b", "wordpiece", "wrap", 128, 1_000_000),
]
VOCAB = {"gpt2": 50259, "wordpiece": 30523}  # GPT-2 ids + pad + mask; bert-base-uncased's 30,522 + mask


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}:{r[1]}")
def test_paper_recipe_builds_at_full_size(recipe):
    """Each paper recipe at its real size on the 8 devices: config checks, the sampler config, and the 'small'
    network plus its train state as shapes only (jax.eval_shape: nothing is allocated or computed)."""
    from ddlm import models
    from ddlm.sampling import config as sampler_config
    from ddlm.train import state as state_lib

    name, arg, corpus, tokenizer, packing, seq_len, steps = recipe
    config = load_config(os.path.join(REPO, "experiments", f"{name}.py"), arg)
    assert (config.data.corpus, config.data.tokenizer, config.data.packing) == (corpus, tokenizer, packing)
    assert (config.train.seq_len, config.train.batch_size, config.train.steps) == (seq_len, 512, steps)
    assert (config.optim.lr, config.optim.warmup_steps, config.optim.decay) == (3e-4, 2500, "constant")
    if corpus == "lm1b":
        assert (config.data.train_split, config.data.eval_split) == ("train", "test")
    trainer.validate_config(config, 8)
    sampler_config.validate(config.sampler, diffusion=config.diffusion, seq_len=seq_len)
    mesh = sharding.make_mesh(config.mesh)
    model = models.get_model(config.model, VOCAB[tokenizer])
    tx = optim.make_optimizer(config.optim, config.train.steps)
    inputs = state_lib.model_init_inputs(config.diffusion.loss, 8, seq_len)
    _, _, abstract = state_lib.make_train_state(model, tx, mesh, seed=0, init_inputs=inputs)
    state = abstract()
    n = state_lib.count_params(state.params)
    # 12 blocks of width 768 (~85M with adaLN, ~85M without) plus untied input/output embeddings.
    embeddings = 2 * 768 * VOCAB[tokenizer]
    assert 80e6 < n - embeddings < 100e6, (n, embeddings)
    assert jax.tree.leaves(state.opt_state)[1].shape  # Adam moments exist as shapes


def test_config_arg_string():
    config = load_config(os.path.join(REPO, "experiments", "bd3lm.py"), "block_size=16")
    assert config.model.block_size == 16
    medium = load_config(os.path.join(REPO, "experiments", "mdlm.py"), "size=medium")
    assert medium.model.num_layers == 24 and medium.model.d_model == 1024
    big = load_config(os.path.join(REPO, "experiments", "mdlm.py"), "size=1b")
    assert big.model.d_model == 2048
    with pytest.raises(ValueError, match="unknown config arg 'sise'"):
        load_config(os.path.join(REPO, "experiments", "mdlm.py"), "sise=medium")
    # The common args: local (size tiny unless named), steps=N and what follows it, their bad values.
    mdlm = os.path.join(REPO, "experiments", "mdlm.py")
    short = load_config(mdlm, "local,steps=200")
    assert (short.train.steps, short.optim.warmup_steps, short.train.log_every, short.train.eval_every) == (
        200,
        4,
        8,
        50,
    )
    assert short.optim.ema_decay == pytest.approx(1 - 25 / 200) and short.model.num_layers == 2
    assert load_config(mdlm, "local,size=small").model.num_layers == 12
    long = load_config(mdlm, "steps=2000000")  # scaling up keeps the recipe's warmup and EMA
    assert (long.train.steps, long.optim.warmup_steps, long.optim.ema_decay) == (2_000_000, 2500, 0.9999)
    with pytest.raises(ValueError, match="local trains on Shakespeare; corpus=lm1b"):
        load_config(mdlm, "local,corpus=lm1b")
    with pytest.raises(
        ValueError,
        match=r"config arg steps='many' in 'local,steps=many': expected int \(like the default 0\)",
    ):
        load_config(mdlm, "local,steps=many")


# ------------------------------------------------------------------------------------------------ validation


def quick_config(**overrides):
    """experiments/quickstart.py:smoke (1 layer, 32 wide, 8 x 16 tokens) with `overrides` ('train.steps': 4)."""
    config = load_config(os.path.join(REPO, "experiments", "quickstart.py"), "smoke")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("train.batch_size", 0, "an integer >= 1"),
        ("train.seq_len", 0, "an integer >= 1"),
        ("train.eval_batch_size", -8, "an integer >= 1"),
        ("train.eval_batches", 0, "an integer >= 1"),
        ("train.steps", 0, "an integer >= 1"),
        ("train.log_every", 0, "an integer >= 1"),
        ("train.keep_checkpoints", 0, "an integer >= 1"),
        ("train.ckpt_every", -1, "an integer >= 0"),
        ("train.nan_policy", "ignore", "one of"),
        ("train.seed", -1, r"an integer in \[0, 2\^32\)"),
        ("train.seed", 2**32, r"an integer in \[0, 2\^32\)"),
        ("optim.lr", -3e-4, "a finite number > 0"),
        ("optim.lr", 0.0, "a finite number > 0"),
        ("optim.lr", float("inf"), "a finite number > 0"),
        ("optim.lr", float("nan"), "a finite number > 0"),
        ("optim.warmup_steps", -1, "an integer >= 0"),
        ("optim.decay", "linear", "'constant' or 'cosine'"),
        ("optim.min_lr_ratio", 1.5, r"in \[0, 1\]"),
        ("optim.b1", 1.0, r"in \[0, 1\)"),
        ("optim.b2", -0.1, r"in \[0, 1\)"),
        ("optim.eps", 0.0, "a finite number > 0"),
        ("optim.weight_decay", -0.1, "a finite number >= 0"),
        ("optim.grad_clip", -1.0, "a finite number >= 0"),
        ("optim.grad_accum_steps", 0, "an integer >= 1"),
        ("optim.ema_decay", 1.0, r"in \[0, 1\)"),
        ("optim.ema_decay", -0.5, r"in \[0, 1\)"),
    ],
)
def test_bad_train_and_optim_fields_are_one_line_naming_the_field(field, value, expected):
    config = quick_config(**{field: value})
    with pytest.raises(ConfigError, match=rf"^config\.{field} must be {expected}.*got") as info:
        trainer.validate_config(config, num_devices=8)
    assert "\n" not in str(info.value)
    trainer.validate_config(quick_config(), num_devices=8)  # the defaults pass


def llama_config(**overrides):
    """experiments/llada.py:smoke (a 1-layer, 32-wide LLaMA network, 2 heads) with `overrides`."""
    config = load_config(os.path.join(REPO, "experiments", "llada.py"), "smoke")
    config.update_from_flattened_dict(overrides)
    return config


NAN = float("nan")
# (config maker, overrides, field the line must start with, what it must say): every model field of both
# network families, the diffusion fields and how the loss pairs with the network, and the data fields.
BAD_FIELDS = [
    # ---- model, DiT family (quickstart: d_model 32, 2 heads, seq_len 16)
    (quick_config, {"model.name": "gpt"}, "model.name", "must be one of"),
    (quick_config, {"model.num_layers": 0}, "model.num_layers", "must be an integer >= 1"),
    (quick_config, {"model.d_model": 0}, "model.d_model", "must be an integer >= 1"),
    (quick_config, {"model.d_model": -32}, "model.d_model", "must be an integer >= 1"),
    (quick_config, {"model.num_heads": 0}, "model.num_heads", "must be an integer >= 1"),
    (quick_config, {"model.mlp_dim": 0}, "model.mlp_dim", "must be an integer >= 1"),
    (quick_config, {"model.cond_dim": -1}, "model.cond_dim", "must be an integer >= 1"),
    (quick_config, {"model.block_size": 0}, "model.block_size", "must be an integer >= 1"),
    (quick_config, {"model.vocab_multiple": 0}, "model.vocab_multiple", "must be an integer >= 1"),
    (quick_config, {"model.dropout": 1.5}, "model.dropout", r"must be in \[0, 1\), got 1.5"),
    (quick_config, {"model.dropout": -0.5}, "model.dropout", r"must be in \[0, 1\), got -0.5"),
    (quick_config, {"model.dropout": 1.0}, "model.dropout", r"must be in \[0, 1\)"),
    (quick_config, {"model.dropout": NAN}, "model.dropout", r"must be in \[0, 1\), got nan"),
    (quick_config, {"model.dtype": "float16"}, "model.dtype", "must be one of .*'auto'"),
    (quick_config, {"model.param_dtype": "auto"}, "model.param_dtype", "must be one of"),
    (quick_config, {"model.remat_policy": "none"}, "model.remat_policy", "'full', 'dots_saveable'"),
    (quick_config, {"model.attention_impl": "flash"}, "model.attention_impl", "must be one of"),
    (quick_config, {"model.attention_impl": "cudnn"}, "model.attention_impl", "needs a GPU"),
    (quick_config, {"model.num_heads": 3}, "model.num_heads", "=3 must divide config.model.d_model=32"),
    (quick_config, {"model.num_heads": 32}, "model.num_heads", "width 1 .*needs an even head width"),
    (quick_config, {"model.attention": "causal"}, "model.attention", "contradicts config.model.name='dit'"),
    (quick_config, {"model.num_kv_heads": 1}, "model.num_kv_heads", "must be 0 for name='dit'"),
    (quick_config, {"model.head_dim": 16}, "model.head_dim", "must be 0 for name='dit'"),
    (quick_config, {"model.rope_base": 5e5}, "model.rope_base", "must be 10000.0 for name='dit'"),
    (quick_config, {"model.qkv_bias": True}, "model.qkv_bias", "must be False for name='dit'"),
    (quick_config, {"model.norm_eps": 1e-6}, "model.norm_eps", "must be 1e-05 for name='dit'"),
    (quick_config, {"model.norm_eps": -1.0}, "model.norm_eps", "must be a finite number > 0"),
    (quick_config, {"model.num_kv_heads": -1}, "model.num_kv_heads", "must be an integer >= 0"),
    (quick_config, {"model.name": "ar"}, "model.time_conditioning", "must be False for a causal network"),
    (
        quick_config,
        {"model.name": "ar", "model.time_conditioning": False, "model.logit_shift": True},
        "model.logit_shift",
        "must be False for a causal network",
    ),
    (
        quick_config,
        {"model.name": "bd3lm", "diffusion.loss": "bd3lm", "model.block_size": 5},
        "model.block_size",
        "=5 must divide config.train.seq_len=16",
    ),
    # ---- model, LLaMA family (llada: d_model 32, 2 heads, 2 kv heads)
    (llama_config, {"model.attention": ""}, "model.attention", "must be one of .*for name='llama'"),
    (llama_config, {"model.num_kv_heads": 3}, "model.num_kv_heads", "=3 must divide .*num_heads=2"),
    (llama_config, {"model.head_dim": 7}, "model.head_dim", "=7 gives heads of width 7"),
    (llama_config, {"model.head_dim": -2}, "model.head_dim", "must be an integer >= 0"),
    (llama_config, {"model.num_heads": 6}, "model.num_heads", "must divide .*or set config.model.head_dim"),
    (llama_config, {"model.rope_base": 0.0}, "model.rope_base", "must be a finite number > 0"),
    (llama_config, {"model.rope_base": float("inf")}, "model.rope_base", "must be a finite number > 0"),
    (llama_config, {"model.norm_eps": 0.0}, "model.norm_eps", "must be a finite number > 0"),
    (llama_config, {"model.time_conditioning": True}, "model.time_conditioning", "must be False for a LLaMA"),
    (llama_config, {"model.dropout": 1.5}, "model.dropout", r"must be in \[0, 1\)"),
    # ---- diffusion
    (quick_config, {"diffusion.loss": "foo"}, "diffusion.loss", "must be one of .*'mdlm'.*got 'foo'"),
    (quick_config, {"diffusion.schedule": "exp"}, "diffusion.schedule", "must be one of .*'loglinear'"),
    (
        quick_config,
        {"diffusion.schedule_kwargs.eps": 2.0},
        "diffusion.schedule_kwargs",
        r"eps must be in \[0, 1.0\), got 2.0",
    ),
    (quick_config, {"diffusion.schedule": "geometric"}, "diffusion.schedule_kwargs", "unknown parameters"),
    (quick_config, {"diffusion.process": "gaussian"}, "diffusion.process", "must be one of"),
    (quick_config, {"diffusion.process": "uniform"}, "diffusion.process", "must be 'absorbing' for loss="),
    (quick_config, {"diffusion.loss": "sedd_uniform"}, "diffusion.process", "must be 'uniform' for loss="),
    (quick_config, {"diffusion.num_steps": -1}, "diffusion.num_steps", "must be an integer >= 0"),
    (quick_config, {"diffusion.num_steps": 10}, "diffusion.num_steps", "must be 0 for loss='mdlm'"),
    (quick_config, {"diffusion.loss": "d3pm"}, "diffusion.num_steps", "must be >= 1 for loss='d3pm'"),
    (quick_config, {"diffusion.loss": "bd3lm"}, "diffusion.loss", "do not go together"),
    (quick_config, {"diffusion.loss": "ar"}, "diffusion.loss", "needs a causal network"),
    (quick_config, {"diffusion.loss": "radd"}, "model.time_conditioning", "must be False for loss='radd'"),
    # ---- data and train
    (quick_config, {"data.validation_fraction": 1.0}, "data.validation_fraction", r"must be in \[0, 1\)"),
    (quick_config, {"data.validation_fraction": -0.1}, "data.validation_fraction", r"must be in \[0, 1\)"),
    (quick_config, {"data.vocab_size": -1}, "data.vocab_size", "must be an integer >= 0"),
    (quick_config, {"data.num_workers": -1}, "data.num_workers", "must be an integer >= 0"),
    (quick_config, {"data.worker_buffer_size": 0}, "data.worker_buffer_size", "must be an integer >= 1"),
    (quick_config, {"data.packing": "none"}, "data.packing", "must be one of .*'wrap'"),
    (quick_config, {"data.spm_model_type": "word"}, "data.spm_model_type", "must be one of .*'bpe'"),
    (quick_config, {"data.sft_template": "alpaca"}, "data.sft_template", "must be one of"),
    (quick_config, {"data.corpus": ""}, "data.corpus", "must be a non-empty string"),
    (quick_config, {"data.text_field": ""}, "data.text_field", "must be a non-empty string"),
    (quick_config, {"train.peak_flops_per_device": -1.0}, "train.peak_flops_per_device", ">= 0"),
    (quick_config, {"train.peak_flops_per_device": NAN}, "train.peak_flops_per_device", ">= 0"),
]


@pytest.mark.parametrize(
    "make, overrides, field, expected",
    BAD_FIELDS,
    ids=[f"{f}={list(o.values())[-1]!r}" for _, o, f, _ in BAD_FIELDS],
)
def test_bad_model_diffusion_and_data_fields_are_one_line_naming_the_field(make, overrides, field, expected):
    """Issue 21 item 7: no model field was checked (dropout 1.5 trained; d_model 0 was a ZeroDivisionError
    deep in the network); nor were several diffusion and data fields (diffusion.loss=foo failed only once
    traced, after the metrics files were written)."""
    with pytest.raises(ConfigError, match=rf"^config\.{re.escape(field)}\b.*{expected}") as info:
        trainer.validate_config(make(**overrides), num_devices=8)
    assert "\n" not in str(info.value)
    trainer.validate_config(make(), num_devices=8)  # the experiment's own values pass


def test_short_validation_split_fails_before_training(tmp_path, monkeypatch):
    """The validation split (35 documents, ~230k characters) has no batch of 16384 x 16 tokens: a
    ConfigError naming both fields, raised before the train step is compiled or anything is written."""

    def no_compile(setup):
        raise AssertionError("the train step was compiled before the validation split was checked")

    monkeypatch.setattr(trainer, "compile_train_step", no_compile)
    config = quick_config(**{"train.eval_batch_size": 16384})
    with pytest.raises(
        ConfigError, match=r"config\.train\.eval_batch_size=16384 x config\.train\.seq_len=16"
    ):
        trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    # Issue 21 item 12: the workdir did not exist, and a rejected config leaves none behind.
    assert not os.path.exists(tmp_path / "run")
    # A workdir that existed stays, and so does everything in it.
    os.makedirs(tmp_path / "mine" / "notes")
    (tmp_path / "mine" / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"config\.train\.eval_batch_size=16384"):
        trainer.train_and_evaluate(config, str(tmp_path / "mine"), devices=jax.devices()[:1])
    assert (tmp_path / "mine" / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes"]


def test_config_mistakes_create_nothing_and_an_untraceable_network_writes_no_metrics(tmp_path, monkeypatch):
    """Issue 21 item 12: diffusion.loss=foo was rejected only when the loss was traced, after metrics.jsonl
    and the TensorBoard files were written. Now the config's own mistakes are found before the workdir is
    touched, and the metric files are opened only once the steps compiled: a network that cannot be traced
    leaves no workdir behind."""

    def no_build(config, devices=None):
        raise AssertionError("built (the workdir probed, the tokenizer loaded) before the config was checked")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer, "build", no_build)
        with pytest.raises(ConfigError, match=r"^config\.diffusion\.loss must be one of .*got 'foo'"):
            trainer.train_and_evaluate(quick_config(**{"diffusion.loss": "foo"}), str(run))
    assert not os.path.exists(run)

    def untraceable(setup):
        raise ValueError("the network cannot be traced")

    monkeypatch.setattr(trainer, "compile_eval_step", untraceable)
    with pytest.raises(ValueError, match="cannot be traced"):
        trainer.train_and_evaluate(quick_config(), str(run), devices=jax.devices()[:1])
    assert not os.path.exists(run)


def test_remove_empty_folders_keeps_every_folder_that_holds_a_file(tmp_path):
    root = tmp_path / "run"
    for folder in ("checkpoints/a/b", "empty/deeper", "kept/empty"):
        os.makedirs(root / folder)
    (root / "kept" / "metrics.jsonl").write_text("")  # an empty file is still a file
    trainer.remove_empty_folders(str(root))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["kept", "kept/metrics.jsonl"]
    (root / "kept" / "metrics.jsonl").unlink()
    trainer.remove_empty_folders(str(root))
    assert not root.exists()
    trainer.remove_empty_folders(str(root))  # a folder that is gone: nothing to do


# ------------------------------------------------------------------------------------------------ the loop


def _committed(directory) -> list[int]:
    from ddlm import checkpoints

    return checkpoints.committed_steps(directory)


def test_nan_skip_counts_each_step_once_and_a_finished_rerun_compiles_nothing(tmp_path, monkeypatch, caplog):
    """The loop's bookkeeping, with a stand-in for the compiled steps (the real train step's NaN flag is
    tested above): every step is non-finite under nan_policy=skip, and the skipped list is exactly
    [1, 2, 3, 4] (each step counted once, whichever of the one-step-late, logging and checkpoint checks
    sees it); the progress bar advances once per step; a rerun of the finished job compiles nothing and
    samples only while no samples were written."""
    import json
    import logging as python_logging

    from ddlm.train import console

    def nan_step(state, batch):
        nan = jnp.float32(jnp.nan)
        return state.replace(step=state.step + 1), {"loss": nan, "grad_norm": nan, "finite": jnp.float32(0)}

    def zero_eval(params, batch, rng):
        return {"loss_sum": jnp.float32(0), "tokens": jnp.float32(1)}

    build = trainer.build

    def build_zero_init(config, devices=None):  # zeros for the parameters: no init to compile
        setup = build(config, devices)
        setup.init_state = lambda: jax.tree.map(
            lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), setup.abstract_state()
        )
        return setup

    updates, samplings, hooked = [], [], []
    update = console.TrainProgress.update
    monkeypatch.setattr(trainer, "build", build_zero_init)
    monkeypatch.setattr(trainer, "compile_train_step", lambda setup: nan_step)
    monkeypatch.setattr(trainer, "compile_eval_step", lambda setup: zero_eval)
    monkeypatch.setattr(
        console.TrainProgress, "update", lambda self, s, loss: (updates.append(s), update(self, s, loss))
    )
    monkeypatch.setattr(
        trainer, "run_sampling_if_available", lambda config, workdir: samplings.append(workdir)
    )
    # The seam of the kill tests (tests/killable_main.py): called after each checkpoint, once it is on disk.
    monkeypatch.setattr(
        trainer,
        "AFTER_CHECKPOINT_HOOKS",
        [lambda step: hooked.append((step, _committed(os.path.join(tmp_path, "run", "checkpoints"))))],
    )
    # Checked one step late (1), at logging (2, 4) and at a checkpoint that is not logged (3).
    config = quick_config(
        **{
            "train.steps": 4,
            "train.log_every": 2,
            "train.ckpt_every": 3,
            "train.nan_policy": "skip",
            "train.sample_at_end": True,
        }
    )
    workdir = str(tmp_path / "run")
    devices = jax.devices()[:1]
    caplog.set_level(python_logging.INFO)
    trainer.train_and_evaluate(config, workdir, devices=devices)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in train] == [(2, 2), (4, 4)]
    assert "Skipped 4 non-finite steps: [1, 2, 3, 4]" in caplog.text
    assert updates == [1, 2, 3, 4]
    assert samplings == [workdir]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
    assert hooked == [(3, [3]), (4, [3, 4])]

    # The rerun: restores step 4, compiles nothing, samples again only while no samples exist.
    def no_compile(setup):
        raise AssertionError("a finished job's rerun compiled a step")

    monkeypatch.setattr(trainer, "compile_train_step", no_compile)
    monkeypatch.setattr(trainer, "compile_eval_step", no_compile)
    caplog.clear()
    assert trainer.train_and_evaluate(config, workdir, devices=devices) == {}
    assert "Already trained to step 4 (config.train.steps=4): nothing to do" in caplog.text
    assert samplings == [workdir, workdir]  # no samples on disk: the first run was stopped before them
    os.makedirs(os.path.join(workdir, "samples", "20261130-101500-step3-ancestral"))  # another step's
    trainer.train_and_evaluate(config, workdir, devices=devices)
    assert samplings == [workdir] * 3
    os.makedirs(os.path.join(workdir, "samples", "20261130-101600-step4-ancestral"))  # ddlm.sampling.cli's
    trainer.train_and_evaluate(config, workdir, devices=devices)
    assert samplings == [workdir] * 3
    assert "Samples of step 4 are already in" in caplog.text
