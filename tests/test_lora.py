"""LoRA and QLoRA through qwix (ddlm/train/lora.py): zero-initialised adapters leave the network exactly as it
was, merged weights compute what base + adapter compute (forward and KV-cache decoding), QLoRA stores the MLP
kernels as integers close to the float ones, the trainer's LoRA mode checkpoints the adapter alone and resumes
from it with the base untouched, and bad settings are one-line errors."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from ddlm import checkpoints, models
from ddlm.sharding import ConfigError
from ddlm.train import lora, trainer
import model_utils

VOCAB = 40
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB - 1, (2, 16)), jnp.int32)


def _config(name, arg="smoke"):
    return model_utils.experiment_config(name, arg)


def _lora_config(rank=4, quantize="none"):
    c = lora.default_config()
    c.rank, c.alpha, c.quantize = rank, 8.0, quantize
    return c


def _network(kind):
    """(model, t, base params) of a tiny DiT (time-conditioned) or LLaMA network with random parameters."""
    if kind == "dit":
        model, t = model_utils.tiny_model("dit", VOCAB, True), jnp.full((2,), 0.3)
    else:
        model, t = model_utils.tiny_llama("bidirectional", VOCAB), None
    variables = model_utils.random_variables(model, TOKENS, t)
    return model, t, flax.core.unfreeze(flax.linen.meta.unbox(variables["params"]))


def _apply(model, params, t):
    """The network's logits, jitted: qwix finds a kernel used through a slice (the DiT's qkv) by tracing it
    back to the parameter, which only a traced call allows (ddlm always runs its networks under jit)."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, t))(params, TOKENS)


def _adapter(wrapped, t, seed=None):
    """The adapter parameters qwix creates (B = 0), or random ones everywhere with a seed."""
    params = jax.jit(lambda r: flax.linen.meta.unbox(wrapped.init(r, TOKENS, t)["params"]))(jax.random.key(0))
    adapter = lora.split(params)[1]
    if seed is None:
        return adapter
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), adapter)


@pytest.mark.parametrize("kind", ["dit", "llama"])
def test_zero_initialised_adapters_give_the_base_logits_exactly(kind):
    model, t, base = _network(kind)
    wrapped = lora.wrap(model, _lora_config())
    adapter = _adapter(wrapped, t)
    names = sorted("/".join(k) for k in flax.traverse_util.flatten_dict(adapter))
    # Every block's attention and MLP projections, nothing else.
    assert names and all(("/attn/" in n or "/mlp/" in n) and n.endswith(lora.ADAPTER_SUFFIXES) for n in names)
    blocks = {n.split("/")[0] for n in names}
    assert blocks == {"block_0", "block_1"}
    assert any("/attn/" in n for n in names) and any("/mlp/" in n for n in names)
    assert all(float(jnp.abs(v).max()) == 0.0 for k, v in flax.traverse_util.flatten_dict(adapter).items() if k[-1].endswith("_lora_b"))
    plain = _apply(model, base, t)
    adapted = _apply(wrapped, lora.combine(base, adapter), t)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))


@pytest.mark.parametrize("kind", ["dit", "llama"])
def test_merged_weights_give_the_adapted_logits_forward_and_decoding(kind):
    model, t, base = _network(kind)
    cfg = _lora_config()
    wrapped = lora.wrap(model, cfg)
    adapter = _adapter(wrapped, t, seed=1)
    adapted = np.asarray(_apply(wrapped, lora.combine(base, adapter), t))
    plain = np.asarray(_apply(model, base, t))
    assert np.abs(adapted - plain).max() > 0.1  # the adapters change the network
    merged = lora.merge(base, adapter, cfg)
    np.testing.assert_allclose(np.asarray(_apply(model, merged, t)), adapted, rtol=2e-4, atol=2e-4)
    # The KV-cache decode path of the plain network with the merged weights: a prefill is the forward.
    logits, _ = models.make_decoder(model, {"params": merged}).prefill(TOKENS, t=t)
    np.testing.assert_allclose(np.asarray(logits), adapted, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("quantize,tolerance", [("int8", 0.02), ("int4", 0.3)])
def test_qlora_stores_the_mlp_kernels_as_integers_close_to_the_floats(quantize, tolerance):
    model, t, base = _network("dit")
    cfg = _lora_config(quantize=quantize)
    wrapped = lora.wrap(model, cfg)
    frozen = lora.quantize_base(base, wrapped, (TOKENS, t, None), cfg)
    flat = flax.traverse_util.flatten_dict(frozen, is_leaf=lambda _, x: isinstance(x, qwix._src.providers.ptq.WithAux))
    quantized = {"/".join(k) for k, v in flat.items() if not isinstance(v, jax.Array)}
    assert quantized == {f"block_{i}/mlp/{f}/kernel" for i in (0, 1) for f in ("fc_in", "fc_out")}
    qvalue = flat[("block_0", "mlp", "fc_in", "kernel")].array.qvalue
    assert qvalue.dtype == (jnp.int8 if quantize == "int8" else jnp.int4)
    assert lora.tree_bytes(frozen) < lora.tree_bytes(base)
    adapter = _adapter(wrapped, t)
    plain = np.asarray(_apply(model, base, t))
    q = np.asarray(_apply(wrapped, lora.combine(frozen, adapter), t))
    error = np.abs(q - plain).max() / np.abs(plain).max()
    assert 0 < error < tolerance


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
    """A checkpoint of the SFT quickstart's smoke-size network (its initial state: training would only cost
    compile time), the base a LoRA run adapts."""
    workdir = str(tmp_path_factory.mktemp("base"))
    config = _config("sft_lora_quickstart", "smoke,lora=0")
    config.train.init_from = ""
    config.train.seed = 3
    setup = trainer.build(config, jax.devices()[:1])
    state = setup.init_state()
    # Non-zero adaLN weights: the initial DiT's zero modulations would make every block the identity.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), state.params)
    state = state.replace(params=params, ema_params=params)
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), async_save=False) as ck:
        ck.save(1, state, metadata=checkpoints.checkpoint_metadata(config, setup.tokenizer))
    return workdir, params


def test_lora_training_checkpoints_the_adapter_alone_and_resumes(base_workdir, tmp_path):
    base_dir, base_params = base_workdir
    config = _config("sft_lora_quickstart", "smoke")
    config.train.init_from = base_dir
    config.train.steps, config.train.ckpt_every = 2, 1
    workdir = str(tmp_path / "lora")
    trainer.train_and_evaluate(config, workdir, jax.devices()[:1])
    setup = trainer.build(config, jax.devices()[:1])
    # The state holds the adapters and the output layer (the recipe's train_also) alone; the frozen base is
    # the base checkpoint, unchanged.
    names = checkpoints.leaf_paths(setup.abstract_state().params)[0]
    adapters = [n for n in names if n.endswith(lora.ADAPTER_SUFFIXES)]
    assert adapters and sorted(set(names) - set(adapters)) == ["output_bias", "output_kernel"]
    for a, b in zip(jax.tree.leaves(setup.frozen), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), read_only=True) as ck:
        assert ck.all_steps() == [1, 2]
        restored, step = ck.restore_latest(setup.abstract_state())
    assert step == 2
    stored = checkpoints.leaf_paths(restored.params)[0]
    assert stored == names
    trained = flax.traverse_util.flatten_dict(restored.params)
    assert any(float(jnp.abs(v).max()) > 0 for k, v in trained.items() if k[-1].endswith("_lora_b"))  # it trained
    # The output layer started from the base's (not a fresh initialisation): 2 steps of lr <= 2e-3 move it
    # by at most 2 * lr per value under Adam, far less than a redrawn initialisation would.
    base_out = np.asarray(base_params["output_kernel"])
    moved = np.abs(np.asarray(trained[("output_kernel",)]) - base_out).max()
    assert 0 < moved < 5e-3
    # Resuming: a third step starts from the adapter of step 2.
    config.train.steps = 3
    trainer.train_and_evaluate(config, workdir, jax.devices()[:1])
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), read_only=True) as ck:
        assert ck.all_steps()[-1] == 3
        resumed, _ = ck.restore_latest(setup.abstract_state())
    assert resumed.step == 3
    # The merged network computes what base + adapter compute.
    full = lora.combine(setup.frozen, resumed.ema_params)
    t = jnp.full((2,), 0.5)
    tokens = TOKENS % setup.tokenizer.vocab_size
    run = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, tokens, t))(p)
    adapted = run(setup.model, full)
    plain_model = models.get_model(config.model, setup.tokenizer.vocab_size)
    merged = lora.merge(setup.frozen, resumed.ema_params, config.lora)
    np.testing.assert_allclose(run(plain_model, merged), adapted, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_qlora_training_runs_on_the_quantized_base(base_workdir, tmp_path, quantize):
    """QLoRA through the trainer: the quantized base is a step argument in its own layout (int4 values are
    passed unpacked, which a step compiled for the packed layout refused), and the adapters train."""
    base_dir, _ = base_workdir
    config = _config("sft_lora_quickstart", f"smoke,quantize={quantize}")
    config.train.init_from = base_dir
    workdir = str(tmp_path / quantize)
    result = trainer.train_and_evaluate(config, workdir, jax.devices()[:1])
    assert np.isfinite(result["bits_per_char"])
    setup = trainer.build(config, jax.devices()[:1])
    with checkpoints.Checkpointer(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR), read_only=True) as ck:
        state, step = ck.restore_latest(setup.abstract_state())
    assert step == config.train.steps
    trained = flax.traverse_util.flatten_dict(state.params)
    assert any(float(jnp.abs(v).max()) > 0 for k, v in trained.items() if k[-1].endswith("_lora_b"))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rank", -1, "config.lora.rank must be an integer >= 0"),
        ("alpha", 0.0, "config.lora.alpha must be a finite number > 0"),
        ("quantize", "int3", "config.lora.quantize must be one of"),
        ("targets", "(attn", "config.lora.targets is not a regex"),
        ("init_from", "", "config.train.init_from must name the workdir of the base model"),
        ("scan_layers", True, "config.model.scan_layers must be False with config.lora.rank > 0"),
        ("train_also", "output_(kernel", "config.lora.train_also is not a regex"),
    ],
)
def test_lora_config_errors_are_one_line(field, value, match):
    config = _config("sft_lora_quickstart")
    if field == "init_from":
        config.train.init_from = value
    elif field == "scan_layers":
        config.model.scan_layers = value
    else:
        config.lora[field] = value
    with pytest.raises(ConfigError, match=match) as e:
        trainer.validate_config(config, 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["dit", "llama"])
def test_train_also_parameters_train_beside_the_adapters_and_merge(kind):
    """config.lora.train_also (PEFT's modules_to_save): the matching base parameters join the trainable part,
    start as the base's values (with zero adapters: the base logits exactly), and a trained value replaces
    the base's in combine and in merge."""
    model, t, base = _network(kind)
    cfg = _lora_config()
    cfg.train_also = "output_kernel|token_embedding"
    wrapped = lora.wrap(model, cfg)
    params = jax.jit(lambda r: flax.linen.meta.unbox(wrapped.init(r, TOKENS, t)["params"]))(jax.random.key(0))
    frozen, trainable = lora.split(params, cfg.train_also)
    flat = flax.traverse_util.flatten_dict(trainable)
    plain = sorted("/".join(k) for k in flat if not k[-1].endswith(lora.ADAPTER_SUFFIXES))
    assert plain == sorted(k for k in ("output_kernel", "token_embedding") if (k,) in flax.traverse_util.flatten_dict(base))
    assert plain and not set(plain) & {"/".join(k) for k in flax.traverse_util.flatten_dict(frozen)}
    assert lora.is_trainable_path(("block_0", "attn", "out_kernel_lora_a"))
    assert not lora.is_trainable_path(("block_0", "attn", "out_kernel"), cfg.train_also)
    seeded = lora.seed_trainable(trainable, base)
    for name in plain:
        np.testing.assert_array_equal(np.asarray(flax.traverse_util.flatten_dict(seeded)[(name,)]), np.asarray(base[name]))
    reference = _apply(model, base, t)
    np.testing.assert_array_equal(np.asarray(_apply(wrapped, lora.combine(base, seeded), t)), np.asarray(reference))
    # zero_adapters (RL's reference with LoRA): random adapters become zeros, the seeded parameters stay.
    random_trainable = lora.combine(_adapter(wrapped, t, seed=2), {"output_kernel": jnp.zeros_like(base["output_kernel"])})
    zeroed = flax.traverse_util.flatten_dict(lora.seed_trainable(random_trainable, base, zero_adapters=True))
    assert all(float(jnp.abs(v).max()) == 0 for k, v in zeroed.items() if k[-1].endswith(lora.ADAPTER_SUFFIXES))
    np.testing.assert_array_equal(np.asarray(zeroed[("output_kernel",)]), np.asarray(base["output_kernel"]))
    # Trained: random adapters and a changed output kernel; merge folds both into the plain network.
    trained = flax.traverse_util.flatten_dict(_adapter(wrapped, t, seed=1))
    trained[("output_kernel",)] = jnp.asarray(base["output_kernel"]) * 1.5
    trained = flax.traverse_util.unflatten_dict(trained)
    adapted = np.asarray(_apply(wrapped, lora.combine(base, trained), t))
    merged = lora.merge(base, trained, cfg)
    np.testing.assert_array_equal(np.asarray(merged["output_kernel"]), np.asarray(base["output_kernel"]) * 1.5)
    np.testing.assert_allclose(np.asarray(_apply(model, merged, t)), adapted, rtol=2e-4, atol=2e-4)
    with pytest.raises(ConfigError, match="train_also matches nowhere_kernel, which the base stores nowhere"):
        lora.seed_trainable({"nowhere_kernel": jnp.zeros(2)}, base)
