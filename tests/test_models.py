"""Tests of ddlm/models: shapes and dtypes, exact attention-pattern properties, time conditioning, rotary
invariance, parameter counts of the presets, and logical-partitioning metadata."""

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models
from model_utils import random_variables as _random_variables
from model_utils import tiny_llama

VOCAB = 37
BATCH, LENGTH, BLOCK = 2, 16, 4


def _config(name="dit", **overrides):
    c = models.default_config("tiny")
    c.name = name
    c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.cond_dim = 2, 32, 2, 64, 16
    c.block_size = BLOCK
    c.time_conditioning = name != "ar"
    for k, v in overrides.items():
        c[k] = v
    return c


def _inputs(seed=0, length=LENGTH):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    xt = jax.random.randint(k1, (BATCH, length), 0, VOCAB)
    x0 = jax.random.randint(k2, (BATCH, length), 0, VOCAB)
    t = jax.random.uniform(k3, (BATCH,))
    return xt, x0, t


def _init(model, xt, t, x0=None):
    return jax.jit(lambda key, xt, t, x0: model.init(key, xt, t, x0=x0))(jax.random.key(0), xt, t, x0)


@functools.cache
def _model_and_vars(name="dit", **overrides):
    """(model, random variables, jitted apply(variables, xt, t, x0)), cached: compiling dominates test time."""
    model = models.get_model(_config(name, **overrides), VOCAB)
    xt, x0, t = _inputs()
    variables = _random_variables(model, xt, t, x0 if name == "bd3lm" else None)
    apply = jax.jit(lambda v, xt, t, x0: model.apply(v, xt, t, x0=x0))
    return model, variables, apply


# ------------------------------------------------------------------------------------------------------------
# Shapes and dtypes.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dit", "ar", "bd3lm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(name, dtype):
    # Abstract evaluation: shapes and dtypes without compiling (values are checked by the other tests).
    model = models.get_model(_config(name, dtype=dtype, dropout=0.1), VOCAB)
    xt, x0, t = _inputs()
    x0 = x0 if name == "bd3lm" else None
    variables = jax.eval_shape(lambda xt, t, x0: model.init(jax.random.key(0), xt, t, x0=x0), xt, t, x0)
    assert set(variables) == {"params"}
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32, "parameters must stay float32 under bfloat16 compute"
    apply = functools.partial(model.apply, train=True, rngs={"dropout": jax.random.key(2)})
    for time in (t, jnp.broadcast_to(t[:, None], xt.shape)) if name != "ar" else (None,):
        logits = jax.eval_shape(apply, variables, xt, time, x0=x0)
        assert logits.shape == (BATCH, LENGTH, VOCAB)
        assert logits.dtype == jnp.float32


def test_bfloat16_close_to_float32():
    _, variables, apply = _model_and_vars("dit")
    xt, _, t = _inputs()
    out = {
        "float32": apply(variables, xt, t, None),
        "bfloat16": jax.jit(models.get_model(_config("dit", dtype="bfloat16"), VOCAB).apply)(
            variables, xt, t
        ),
    }
    scale = float(jnp.std(out["float32"]))
    err = jnp.abs(out["float32"] - out["bfloat16"])
    print(
        f"bf16 vs fp32 logits: mean abs err {float(err.mean()):.4f}, max {float(err.max()):.4f}, std {scale:.2f}"
    )
    assert float(err.mean()) < 0.01 * scale and float(err.max()) < 0.2 * scale


@pytest.mark.parametrize("name", ["dit", "bd3lm"])
def test_per_token_time_equals_broadcast_time(name):
    _, variables, apply = _model_and_vars(name)
    xt, x0, t = _inputs()
    x0 = x0 if name == "bd3lm" else None
    per_token = jnp.broadcast_to(t[:, None], (BATCH, LENGTH))
    np.testing.assert_allclose(apply(variables, xt, t, x0), apply(variables, xt, per_token, x0), atol=1e-5)
    # Per-token times really are per token: changing t at one position changes that position's logits.
    moved = per_token.at[:, 3].set(1.0 - per_token[:, 3])
    diff = jnp.abs(apply(variables, xt, moved, x0) - apply(variables, xt, per_token, x0)).max(axis=(0, 2))
    assert float(diff[3]) > 1e-3


def test_vocab_padding_is_invisible():
    model, variables, apply = _model_and_vars("dit")
    assert model.padded_vocab_size == 128
    params = variables["params"]
    assert params["token_embedding"].value.shape[0] == 128 and params["output_kernel"].value.shape[1] == 128
    unpadded = models.get_model(_config("dit", vocab_multiple=1), VOCAB)
    sliced = dict(params)
    for name, index in (("token_embedding", np.s_[:VOCAB]), ("output_kernel", np.s_[:, :VOCAB])):
        sliced[name] = params[name].replace_boxed(params[name].value[index])
    sliced["output_bias"] = params["output_bias"].replace_boxed(params["output_bias"].value[:VOCAB])
    xt, _, t = _inputs()
    np.testing.assert_allclose(
        jax.jit(unpadded.apply)({"params": sliced}, xt, t),
        apply(variables, xt, t, None),
        rtol=1e-6,
        atol=1e-6,
    )


def test_dropout_only_in_training():
    _, variables, apply = _model_and_vars("dit")
    model = models.get_model(_config("dit", dropout=0.5), VOCAB)  # same parameters, dropout on
    xt, _, t = _inputs()
    run = jax.jit(
        lambda v, key, train: model.apply(v, xt, t, train=train, rngs={"dropout": key}), static_argnums=2
    )
    a, b = run(variables, jax.random.key(1), True), run(variables, jax.random.key(2), True)
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_allclose(
        run(variables, jax.random.key(1), False), apply(variables, xt, t, None), atol=1e-4
    )


def test_remat_checkpoints_blocks_and_keeps_values():
    _, variables, apply = _model_and_vars("dit")
    xt, x0, t = _inputs()
    for name, x0_or_none in (("dit", None), ("bd3lm", x0)):  # bd3lm: the mask is an argument of the block
        remat = models.get_model(_config(name, remat=True), VOCAB)

        def loss(v, remat=remat, x0=x0_or_none):
            logits = remat.apply(v, xt, t, x0=x0, train=True, rngs={"dropout": jax.random.key(0)})
            return jnp.mean(logits**2)

        # Tracing only (no compile): train is a static argument and the blocks are checkpointed.
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables))
        assert "checkpoint" in jaxpr or "remat" in jaxpr
    remat = models.get_model(_config("dit", remat=True), VOCAB)
    np.testing.assert_allclose(
        jax.jit(remat.apply)(variables, xt, t), apply(variables, xt, t, None), rtol=1e-5, atol=1e-5
    )


def test_input_errors_are_clear():
    model = models.get_model(_config("dit"), VOCAB)
    xt, x0, t = _inputs()
    with pytest.raises(ValueError, match=r"tokens must be int \[batch, length\]"):
        model.init(jax.random.key(0), xt.astype(jnp.float32), t)
    with pytest.raises(ValueError, match=r"tokens must be int \[batch, length\]"):
        model.init(jax.random.key(0), xt[0], t)
    with pytest.raises(ValueError, match="t is required"):
        model.init(jax.random.key(0), xt, None)
    with pytest.raises(ValueError, match="t must be float"):
        model.init(jax.random.key(0), xt, t[:1])
    bd3 = models.get_model(_config("bd3lm"), VOCAB)
    with pytest.raises(ValueError, match="needs x0"):
        bd3.init(jax.random.key(0), xt, t)
    with pytest.raises(ValueError, match="block_size must divide seq_len=14"):
        bd3.init(jax.random.key(0), xt[:, :14], t, x0=x0[:, :14])
    with pytest.raises(ValueError, match="no time conditioning"):
        models.get_model(_config("ar", time_conditioning=True), VOCAB).init(jax.random.key(0), xt, t)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
            models.get_model(_config("dit", attention_impl="cudnn"), VOCAB).init(jax.random.key(0), xt, t)
    with pytest.raises(ValueError, match="name must be one of"):
        models.get_model(_config("gpt"), VOCAB)
    bad = _config("dit")
    del bad["remat"]
    with pytest.raises(ValueError, match="lacks fields"):
        models.get_model(bad, VOCAB)


# ------------------------------------------------------------------------------------------------------------
# Attention patterns (exact).
# ------------------------------------------------------------------------------------------------------------


def _changed_positions(a, b):
    """[length] bool: positions whose logits differ at all (exact comparison)."""
    return np.asarray(jnp.any(a != b, axis=(0, 2)))


def test_causal_model_is_causal():
    _, variables, apply = _model_and_vars("ar")
    xt, _, _ = _inputs()
    base = apply(variables, xt, None, None)
    for j in (0, 5, LENGTH - 1):
        changed = _changed_positions(
            base, apply(variables, xt.at[:, j].set((xt[:, j] + 1) % VOCAB), None, None)
        )
        assert not changed[:j].any(), f"changing token {j} changed logits before it"
        assert changed[j:].any(), f"changing token {j} changed nothing at or after it"


def test_dit_is_bidirectional():
    _, variables, apply = _model_and_vars("dit")
    xt, _, t = _inputs()
    changed = _changed_positions(
        apply(variables, xt, t, None), apply(variables, xt.at[:, -1].add(1) % VOCAB, t, None)
    )
    assert changed[0], "the last token must influence the first position's logits"
    assert changed.all()


def test_block_diffusion_mask_matches_brute_force():
    for seq_len, block_size in [(4, 1), (4, 2), (6, 3), (8, 4), (4, 4)]:
        mask = np.asarray(models.block_diffusion_mask(seq_len, block_size))
        assert mask.shape == (2 * seq_len, 2 * seq_len) and mask.dtype == bool
        expected = np.zeros_like(mask)
        for q, k in itertools.product(range(2 * seq_len), repeat=2):
            q_clean, k_clean = q >= seq_len, k >= seq_len
            q_block, k_block = (q % seq_len) // block_size, (k % seq_len) // block_size
            if not q_clean and not k_clean:  # noised attends its own noised block
                expected[q, k] = q_block == k_block
            elif not q_clean and k_clean:  # noised attends strictly earlier clean blocks
                expected[q, k] = k_block < q_block
            elif q_clean and k_clean:  # clean is block-causal
                expected[q, k] = k_block <= q_block
        np.testing.assert_array_equal(mask, expected, err_msg=f"seq_len={seq_len} block_size={block_size}")
    with pytest.raises(ValueError, match="block_size must divide seq_len=6"):
        models.block_diffusion_mask(6, 4)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_block_causal_dependencies(time_conditioning):
    _, variables, apply = _model_and_vars(
        "bd3lm", **({} if time_conditioning else {"time_conditioning": False})
    )
    xt, x0, t = _inputs()
    t = jax.random.uniform(jax.random.key(5), (BATCH, LENGTH)) if time_conditioning else None
    base = apply(variables, xt, t, x0)
    b = 2
    block = slice(b * BLOCK, (b + 1) * BLOCK)
    later_x0 = x0.at[:, b * BLOCK :].set((x0[:, b * BLOCK :] + 7) % VOCAB)
    other_xt = xt.at[:, : b * BLOCK].add(3).at[:, (b + 1) * BLOCK :].add(5) % VOCAB
    out = apply(variables, other_xt, t, later_x0)
    np.testing.assert_array_equal(out[:, block], base[:, block])
    if time_conditioning:  # the times of other blocks do not matter either
        other_t = t.at[:, : b * BLOCK].set(0.9).at[:, (b + 1) * BLOCK :].set(0.1)
        np.testing.assert_array_equal(apply(variables, xt, other_t, x0)[:, block], base[:, block])
    # ... while the clean previous block and the noised block itself do.
    prev_x0 = x0.at[:, (b - 1) * BLOCK].add(1) % VOCAB
    assert _changed_positions(apply(variables, xt, t, prev_x0), base)[block].all()
    own_xt = xt.at[:, b * BLOCK + 1].add(1) % VOCAB
    assert _changed_positions(apply(variables, own_xt, t, x0), base)[block].all()
    # Block 0 sees no clean context at all.
    np.testing.assert_array_equal(apply(variables, xt, t, (x0 + 1) % VOCAB)[:, :BLOCK], base[:, :BLOCK])
    if not time_conditioning:
        # Truncation: the first b + 1 blocks alone give the same logits (absolute rotary positions 0..L-1).
        short = (b + 1) * BLOCK
        np.testing.assert_allclose(
            apply(variables, xt[:, :short], None, x0[:, :short]), base[:, :short], atol=1e-5
        )


# ------------------------------------------------------------------------------------------------------------
# Time conditioning.
# ------------------------------------------------------------------------------------------------------------


def test_adaln_zero_init_ignores_time():
    # adaLN-zero: every modulation is zero at init, so the blocks are identities of t and the output does not
    # depend on t (tied embeddings, so that the logits are not trivially zero).
    model = models.get_model(_config("dit", tie_embeddings=True), VOCAB)
    xt, _, t = _inputs()
    variables = _init(model, xt, t)
    assert "output_kernel" not in variables["params"] and "token_embedding" in variables["params"]
    apply = jax.jit(model.apply)
    a, b = apply(variables, xt, jnp.zeros_like(t)), apply(variables, xt, jnp.ones_like(t))
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_array_equal(a, b)


def test_time_matters_when_on_and_is_ignored_when_off():
    _, variables, apply = _model_and_vars("dit")
    xt, _, _ = _inputs()
    lo, hi = jnp.full((BATCH,), 0.1), jnp.full((BATCH,), 0.9)
    assert float(jnp.abs(apply(variables, xt, lo, None) - apply(variables, xt, hi, None)).max()) > 1e-3

    _, variables, apply = _model_and_vars("dit", time_conditioning=False)
    assert "time_embedding" not in variables["params"]
    base = apply(variables, xt, lo, None)
    np.testing.assert_array_equal(base, apply(variables, xt, hi, None))
    model, _, _ = _model_and_vars("dit", time_conditioning=False)
    assert jax.eval_shape(model.apply, variables, xt, None).shape == base.shape  # t may be None


# ------------------------------------------------------------------------------------------------------------
# Rotary position embedding.
# ------------------------------------------------------------------------------------------------------------


def test_constant_rotary_tables_are_evaluated_once_per_trace_and_equal_the_traced_ones():
    """numpy positions (the full forward pass): the cos/sin tables are evaluated at trace time once and reused
    by every later call (every layer); the rotation equals the one with traced positions (tables in the graph)."""
    layers = models.layers
    x = jax.random.normal(jax.random.key(4), (2, 8, 2, 6))
    layers._constant_rotary_tables.cache_clear()
    twice = jax.jit(lambda x: (models.rotary_embedding(x, np.arange(8)), models.rotary_embedding(2 * x, np.arange(8))))
    a, b = twice(x)
    info = layers._constant_rotary_tables.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    traced = jax.jit(models.rotary_embedding)(x, jnp.arange(8))
    np.testing.assert_allclose(a, traced, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b, 2 * traced, rtol=1e-6, atol=1e-6)
    other = models.rotary_embedding(x, np.arange(3, 11))  # other positions: other tables, not the cached ones
    np.testing.assert_allclose(other, models.rotary_embedding(x, jnp.arange(3, 11)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(other, a)


def test_rotary_scores_depend_on_relative_position_only():
    kq, kk = jax.random.split(jax.random.key(3))
    q = jax.random.normal(kq, (1, 8, 2, 16))
    k = jax.random.normal(kk, (1, 8, 2, 16))
    positions = jnp.arange(8)

    def scores(shift):
        rq = models.rotary_embedding(q, positions + shift)
        rk = models.rotary_embedding(k, positions + shift)
        return jnp.einsum("bqhd,bkhd->bhqk", rq, rk)

    np.testing.assert_allclose(scores(0), scores(37), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(models.rotary_embedding(q, jnp.zeros(8)), q)  # position 0 is the identity
    # Norms are preserved, and the scores are not shift-invariant without rotation (they do depend on m - n).
    np.testing.assert_allclose(
        jnp.linalg.norm(models.rotary_embedding(q, positions), axis=-1),
        jnp.linalg.norm(q, axis=-1),
        rtol=1e-5,
    )
    assert float(jnp.abs(scores(0) - jnp.einsum("bqhd,bkhd->bhqk", q, k)).max()) > 1e-2


@pytest.mark.parametrize("name", ["dit", "bd3lm"])
def test_rotary_tables_of_the_full_forward_pass_are_constants(name):
    """The full forward pass's positions are numpy, so its cos/sin tables are constants of the program (as MDLM's
    cached tables), not operations XLA:CPU would fuse into the rotation and repeat per example and head; they
    equal the tables computed in the graph (traced positions, as in decoding) to float32 rounding."""
    model, variables, _ = _model_and_vars(name)
    xt, x0, t = _inputs()
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, xt, t, x0=x0 if name == "bd3lm" else None))(variables))
    half = _config(name).d_model // _config(name).num_heads // 2
    rotary_tables = re.compile(rf"f32\[1,\d+,{half}\] = (cos|sin) ")  # [1, L, half]; the time embedding's differ
    assert not rotary_tables.search(jaxpr)
    x = jax.random.normal(jax.random.key(4), (2, 300, 2, 16))
    traced = jax.jit(models.rotary_embedding)(x, jnp.arange(300))
    np.testing.assert_allclose(models.rotary_embedding(x, np.arange(300)), traced, rtol=0, atol=1e-4)
    assert rotary_tables.search(str(jax.make_jaxpr(models.rotary_embedding)(x, jnp.arange(300))))  # can fail


# ------------------------------------------------------------------------------------------------------------
# Presets, parameter counts, FLOPs, partitioning metadata.
# ------------------------------------------------------------------------------------------------------------

GPT2_VOCAB = 50_258  # GPT-2 BPE + one mask id


def _abstract_params(config, vocab_size, seq_len=128):
    model = models.get_model(config, vocab_size)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    x0 = tokens if config.name == "bd3lm" else None
    return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), tokens, t, x0=x0)["params"]


@pytest.mark.parametrize(
    "size, low, high",  # non-embedding parameters (blocks, adaLN, time MLP, norms), in millions
    [("small", 85, 100), ("medium", 300, 340), ("1b", 1150, 1300)],
)
def test_preset_parameter_counts(size, low, high):
    config = models.default_config(size)
    params = _abstract_params(config, GPT2_VOCAB)
    total = models.count_params(params)
    embeddings = models.count_params(
        {k: params[k] for k in ("token_embedding", "output_kernel", "output_bias")}
    )
    non_embedding = total - embeddings
    print(f"{size}: total {total / 1e6:.1f}M, non-embedding {non_embedding / 1e6:.1f}M (vocab {GPT2_VOCAB})")
    assert low * 1e6 < non_embedding < high * 1e6
    # The FLOPs estimate is 6 N (+ attention) with N the matmul parameters: the non-embedding count minus the
    # (per-sequence, negligible) conditioning plus the output projection.
    fpt = models.flops_per_token(config, GPT2_VOCAB, seq_len=1024)
    assert 6 * non_embedding * 0.8 < fpt < 6 * total * 1.5


def test_flops_per_token_formula():
    c = _config("dit")
    d, m, n_layers = c.d_model, c.mlp_dim, c.num_layers
    n = n_layers * (4 * d * d + 2 * d * m) + d * VOCAB
    assert models.flops_per_token(c, VOCAB, 64) == 6 * n + 12 * n_layers * d * 64
    c_bd = _config("bd3lm", time_conditioning=False)
    assert models.flops_per_token(c_bd, VOCAB, 64) == 6 * (n + n - d * VOCAB) + 12 * n_layers * d * 4 * 64


@pytest.mark.parametrize("name", ["dit", "ar", "bd3lm"])
def test_every_parameter_has_logical_axis_names(name):
    params = _abstract_params(_config(name, time_conditioning=name != "ar"), VOCAB, seq_len=LENGTH)
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(p, nn.LogicallyPartitioned) for p in boxed)
    for p in boxed:
        assert len(p.names) == len(p.value.shape), (p.names, p.value.shape)
    specs = jax.tree.leaves(
        nn.get_partition_spec(params), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert len(specs) == len(boxed)
    used = {name for p in boxed for name in p.names if name is not None}
    assert used <= {"embed", "mlp", "heads", "kv", "vocab"}
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= used


def test_sharded_forward_matches_unsharded():
    """The logical names map to a (data, fsdp, tensor) mesh of the 8 fake devices; sharding does not change values."""
    rules = (
        ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
        ("kv", None), ("vocab", "tensor"), ("length", None),
    )  # fmt: skip
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.sharding.Mesh(
        np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto
    )
    model, variables, apply = _model_and_vars("bd3lm")
    xt, x0, t = _inputs()
    xt, x0, t = (jnp.concatenate([a, a]) for a in (xt, x0, t))  # batch 4 over data x fsdp
    expected = apply(variables, xt, t, x0)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
    sharded_vars = jax.device_put(variables, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda v, a, b, c: model.apply(v, a, b, x0=c))(sharded_vars, xt, t, x0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_vocabulary_rows_cut_from_weights_unless_split(tie):
    """Outside a vocabulary split the padded rows are cut from the output weights (no [B, L, padded vocab]
    activation, whose slice costs a pad in the backward pass); under a split over 'tensor' the logits are cut.
    Both give the same loss gradients, and the padded rows get exactly zero gradient."""
    model, variables, _ = _model_and_vars("dit", tie_embeddings=tie)
    xt, x0, t = _inputs()

    def loss(v):
        return jnp.sum(jax.nn.log_softmax(model.apply(v, xt, t)) * jax.nn.one_hot(x0, VOCAB))

    wide = f"f32[{BATCH},{LENGTH},{model.padded_vocab_size}]"  # as the jaxpr prints it, sub-jaxprs included
    assert wide not in str(jax.make_jaxpr(jax.grad(loss))(variables))
    expected = jax.jit(jax.grad(loss))(variables)
    # The batch of 2 splits evenly over 'data' (an uneven split gives XLA a wrong embedding gradient).
    rules = (("batch", "data"), ("vocab", "tensor"))
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert models.layers.mesh_split("vocab") == 4
        assert wide in str(jax.make_jaxpr(jax.grad(loss))(variables))
        split = jax.jit(jax.grad(loss))(variables)
    out = "token_embedding" if tie else "output_kernel"
    for got, want in zip(jax.tree.leaves(split), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    rows = nn.unbox(expected["params"][out])
    rows = rows[VOCAB:] if tie else rows[:, VOCAB:]
    assert rows.size and not np.any(np.asarray(rows))


def test_compute_dtype_auto_follows_the_backend_unless_pinned():
    from ddlm.models.factory import compute_dtype

    assert models.default_config("small").dtype == "auto"
    assert compute_dtype("auto", "cpu") == jnp.float32
    assert compute_dtype("auto", "gpu") == jnp.bfloat16 and compute_dtype("auto", "tpu") == jnp.bfloat16
    assert compute_dtype("bfloat16", "cpu") == jnp.bfloat16  # pinned
    assert models.get_model(_config("dit", dtype="auto"), VOCAB).dtype == jnp.float32  # tests run on CPU
    with pytest.raises(ValueError, match="config.model.dtype must be 'auto' or one of"):
        models.get_model(_config("dit", dtype="float16"), VOCAB)


@pytest.mark.parametrize(
    "kernel_shape, n_in",
    [((24, 40), 1), ((40, 24), 1), ((24, 2, 8), 1), ((2, 8, 24), 2)],
    ids=["narrow_input", "wide_input", "heads_out", "heads_in"],
)
def test_projection_derivatives_match_the_plain_product(kernel_shape, n_in):
    """`layers.project` on CPU (a custom JVP whose weight gradient reads a materialised transpose of the input
    or of the cotangent, whichever is narrower) has the plain contraction's value, gradients, forward-mode
    derivatives and second derivatives; in bfloat16 with float32 outputs too (to bfloat16 rounding)."""
    assert models.layers.transposed_weight_grads()  # the tests run on CPU
    kx, kk, kt = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (3, 5) + kernel_shape[:n_in])
    kernel = jax.random.normal(kk, kernel_shape) / 5

    def plain(x, kernel):
        return jnp.tensordot(x, kernel, n_in)

    def loss(product):
        return lambda x, kernel: jnp.sum(jnp.sin(product(x, kernel)) * jnp.arange(1.0, 1.0 + kernel_shape[-1]))

    project = functools.partial(models.layers.project, n_in=n_in)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5)
    close(project(x, kernel), plain(x, kernel))
    for got, want in zip(jax.grad(loss(project), (0, 1))(x, kernel), jax.grad(loss(plain), (0, 1))(x, kernel)):
        close(got, want)
    tangents = (jax.random.normal(kt, x.shape), kernel[::-1] * 0.3)
    close(jax.jvp(project, (x, kernel), tangents)[1], jax.jvp(plain, (x, kernel), tangents)[1])
    hvp = [jax.jvp(jax.grad(loss(p), (0, 1)), (x, kernel), tangents)[1] for p in (project, plain)]
    for got, want in zip(*hvp):
        close(got, want)
    # bfloat16 operands, float32 products (the logits' case)
    x16, kernel16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    out = models.layers.project(x16, kernel16, n_in, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    close(out, plain(x16.astype(jnp.float32), kernel16.astype(jnp.float32)))
    grads = jax.grad(lambda x, k: jnp.sum(models.layers.project(x, k, n_in, jnp.float32) ** 2), (0, 1))
    want = jax.grad(lambda x, k: jnp.sum(plain(x, k) ** 2), (0, 1))
    grads, want = grads(x16, kernel16), want(x16.astype(jnp.float32), kernel16.astype(jnp.float32))
    for got, w in zip(grads, want):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), w, rtol=2e-2, atol=2e-2 * float(np.abs(w).max()))


def _dots_contracting(hlo: str, size: int):
    """(lhs shape, lhs contracting axis) of the rank-2 dots in an HLO module that contract `size` elements."""
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    found = []
    dots = re.findall(r"= \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), lhs_contracting_dims=\{([\d,]*)\}", hlo)
    for lhs, dims in dots:
        lhs_shape = [int(d) for d in shapes[lhs].split(",") if d]
        if [lhs_shape[int(i)] for i in dims.split(",")] == [size] and len(lhs_shape) == 2:
            found.append((tuple(lhs_shape), int(dims)))
    return found


@pytest.mark.parametrize("name", ["dit", "llama"])
def test_cpu_weight_gradients_are_products_of_a_materialised_transpose(monkeypatch, name):
    """The products contracting batch x length (the weight gradients) of a CPU train step read their left
    operand [M, K], contracting its minor axis: the only form XLA:CPU hands to its fast YNNPACK dot (the
    others run through Eigen at about half the rate). With the plain product's gradient (what GPUs get) some
    contract the left operand's major axis -- checked too, so the test can fail."""
    length = 20  # batch x length = 40: no width of either network is 40
    model = models.get_model(_config(name), VOCAB) if name == "dit" else tiny_llama("bidirectional", VOCAB)
    xt, x0, t = _inputs(length=length)
    t = t if name == "dit" else None
    variables = _random_variables(model, xt, t)

    def weight_grad_dots():
        def loss(v):
            return jnp.sum(jax.nn.log_softmax(model.apply(v, xt, t)) * jax.nn.one_hot(x0, VOCAB))

        hlo = jax.jit(jax.grad(loss)).lower(variables).compile().as_text()
        return _dots_contracting(hlo, BATCH * length)

    dots = weight_grad_dots()
    assert len(dots) >= 4 * 2  # per block at least the attention and MLP projections' weight gradients
    assert all(dim == 1 for _, dim in dots), dots
    monkeypatch.setattr(models.layers, "transposed_weight_grads", lambda: False)
    assert any(dim == 0 for _, dim in weight_grad_dots())


def _attention_inputs(batch, kv_heads, dtype=jnp.float32, length=12, heads=4, head_dim=8):
    kq, kk, kv, kg = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim), dtype)
    return q, k, v, jax.random.normal(kg, q.shape, dtype)


@pytest.mark.parametrize(
    "batch, kv_heads, masking",
    [(8, 4, "per_example"), (8, 2, "shared_causal"), (5, 4, "none"), (3, 2, "per_example")],
    ids=["batch8-mha-per_example", "batch8-gqa-shared_causal", "batch5-mha-none", "batch3-gqa-per_example"],
)
def test_cpu_attention_matches_jax_attention(batch, kv_heads, masking):
    """`attention(implementation='xla')` on CPU (ddlm's custom-JVP attention, the batch cut into independent
    chunks) against `jax.nn.dot_product_attention`: values, gradients and forward-mode derivatives, with
    grouped-query heads, per-example masks with a fully masked query row, and a shared mask with is_causal."""
    assert models.layers.cpu_attention()  # the tests run on CPU
    q, k, v, g = _attention_inputs(batch, kv_heads)
    mask, causal = None, masking == "shared_causal"
    if masking != "none":
        mask = jax.random.bernoulli(jax.random.key(6), 0.6, (batch if masking == "per_example" else 1, 1, 12, 12))
        mask = mask.at[0, 0, 3].set(False)  # no key at all: a uniform row, no gradient through it
    ours = functools.partial(models.layers.attention, mask=mask, is_causal=causal)
    ref = functools.partial(jax.nn.dot_product_attention, mask=mask, is_causal=causal)

    # One compiled program per side and dtype (op by op, the primitives' compiles took twice as long).
    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(fn, q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        tangents = (0.3 * g, 0.2 * k[:, ::-1], 0.1 * v)
        return (out, *vjp(g.astype(out.dtype)), jax.jvp(fn, (q, k, v), tangents)[1])

    for got, w in zip(derivatives(ours, q, k, v, g), derivatives(ref, q, k, v, g)):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
    # bfloat16: float32 logits and softmax, bfloat16 probabilities into the value product, as jax's
    q16, k16, v16, g16 = (a.astype(jnp.bfloat16) for a in (q, k, v, g))
    got16, want16 = derivatives(ours, q16, k16, v16, g16), derivatives(ref, q16, k16, v16, g16)
    assert got16[0].dtype == jnp.bfloat16
    for got, w in zip(got16[:4], want16[:4]):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(w, np.float32), rtol=0.05, atol=0.05)


def test_cpu_attention_runs_batch_chunks_unless_the_batch_is_split():
    """On CPU the batch of 8 is attended as CPU_ATTENTION_CHUNKS (2) independent chunks (XLA:CPU then runs their
    single-threaded batched products side by side); when the batch is split over devices it stays whole. Every product of the
    compiled gradient contracts its left operand's minor axis (YNNPACK's form; the key gradient read the score
    cotangent in place before)."""
    q, k, v, g = _attention_inputs(8, 4)
    grad = jax.jit(lambda q, k, v: jax.vjp(lambda *a: models.layers.attention(*a, None), q, k, v)[1](g))
    hlo = grad.lower(q, k, v).compile().as_text()
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    dots = re.findall(r"dot\(%([\w.\-]+), %[\w.\-]+\), lhs_batch_dims=\{[\d,]*\}, lhs_contracting_dims=\{(\d+)\}", hlo)
    chunks = models.layers.CPU_ATTENTION_CHUNKS
    assert chunks > 1
    assert len(dots) >= 4 * chunks  # four products per chunk
    assert all(int(axis) == shapes[lhs].count(",") for lhs, axis in dots), dots

    def score_batches():  # the batch of each [batch, heads, T, S] score product of the forward pass
        jaxpr = str(jax.make_jaxpr(models.layers.attention)(q, k, v, None))
        return re.findall(r"f32\[(\d+),4,12,12\] = dot_general", jaxpr)

    assert score_batches() == [str(8 // chunks)] * chunks
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "data"),)):
        assert models.layers.mesh_split("batch") == 2
        assert score_batches() == ["8"]
