"""ddlm/models/stack.py: the scanned block stack against the unrolled one (logits, gradients under every remat
policy, the KV-cache decode path), the checkpoint-layout converters, the 'layers' axis in the sharding rules,
and a compiled program whose size does not grow with depth (the reason compile time stays flat)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models, sharding
from ddlm.models import decoding, stack

VOCAB = 37


def _config(name="dit", **fields):
    c = models.default_config("tiny")
    c.name = name
    c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.cond_dim = 3, 32, 2, 64, 16
    c.time_conditioning = name != "ar"
    for key, value in fields.items():
        c[key] = value
    return c


def _inputs(batch=2, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (batch, length)), jnp.int32)
    return tokens, jnp.asarray(rng.uniform(0.1, 0.9, batch), jnp.float32)


@functools.lru_cache(maxsize=None)
def _unrolled_params(name="dit"):
    """Parameters of the unrolled network, perturbed away from the zero init (so every block matters)."""
    model = models.get_model(_config(name), VOCAB)
    tokens, t = _inputs()
    init = jax.jit(lambda: model.init({"params": jax.random.key(0)}, tokens, t if name != "ar" else None))
    params = nn.meta.unbox(init()["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def test_stack_and_unstack_are_inverse_and_keep_other_entries():
    params = _unrolled_params()
    stacked = stack.stack_layers(params, 3)
    assert "block_0" not in stacked and stacked["token_embedding"] is params["token_embedding"]
    assert stacked["blocks"]["attn"]["qkv_kernel"].shape == (
        3,
        *params["block_0"]["attn"]["qkv_kernel"].shape,
    )
    back = stack.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="lacks"):
        stack.stack_layers(params, 4)
    with pytest.raises(ValueError, match="not a scanned tree"):
        stack.unstack_layers(params)


@pytest.mark.parametrize(
    "name, variants",
    [("dit", ((False, "full"), (True, "full"), (True, "dots_saveable"))), ("ar", ((False, "full"),))],
)
def test_scanned_network_matches_unrolled_logits_and_gradients(name, variants):
    """Same parameters (converted), same logits (atol 1e-5) and the same gradients (rtol 1e-4, atol 1e-5 of
    the tensor's largest entry: float32 summation order) with scan and remat none / full / dots_saveable."""
    params = _unrolled_params(name)
    tokens, t = _inputs()
    t = t if name != "ar" else None
    weights = jax.random.normal(jax.random.key(2), (*tokens.shape, VOCAB))

    def logits_and_grads(model, p):
        def loss(p):
            logits = model.apply({"params": p}, tokens, t, train=True)
            return jnp.sum(logits * weights), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return logits, grads

    want_logits, want_grads = jax.jit(
        functools.partial(logits_and_grads, models.get_model(_config(name), VOCAB))
    )(params)
    for remat, policy in variants:
        scanned = models.get_model(_config(name, scan_layers=True, remat=remat, remat_policy=policy), VOCAB)
        logits, grads = jax.jit(functools.partial(logits_and_grads, scanned))(stack.stack_layers(params, 3))
        np.testing.assert_allclose(logits, want_logits, atol=1e-5)
        grads = stack.unstack_layers(grads)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            w = want_grads
            for k in path:
                w = w[k.key]
            scale = float(np.max(np.abs(w))) or 1.0
            np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{policy} {jax.tree_util.keystr(path)}"
            )


def test_scanned_init_has_the_layer_axis_and_shards_like_unrolled():
    model = models.get_model(_config(scan_layers=True), VOCAB)
    tokens, t = _inputs()
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, tokens, t))["params"]
    qkv = boxed["blocks"]["attn"]["qkv_kernel"]
    assert qkv.names == ("layers", "embed", None, "heads", "kv") and qkv.value.shape[0] == 3
    spec = nn.logical_to_mesh_axes(qkv.names, sharding.LOGICAL_AXIS_RULES)
    assert tuple(spec) == (None, "fsdp", None, "tensor", None)  # the layer axis is never split


def test_scanned_decode_matches_unrolled_decode():
    """The KV-cache path through scanned parameters: prefill, then a step reading the filled cache; logits
    and every layer's keys/values equal the unrolled network's (atol 1e-5)."""
    params = _unrolled_params("ar")
    tokens, _ = _inputs()
    outs = []
    new_tokens = jnp.asarray([[3, 4], [5, 6]], jnp.int32)
    for scan, p in ((False, params), (True, stack.stack_layers(params, 3))):
        model = models.get_model(_config("ar", scan_layers=scan), VOCAB)
        decoder = decoding.make_decoder(model, {"params": p})
        logits, cache = decoder.prefill(tokens, capacity=20)
        # a step that reads the filled cache: two new tokens after the 16 cached ones
        attend = jnp.arange(20) < 16
        step_logits, cache = decoder.step(
            cache, new_tokens, jnp.arange(16, 18), attend, decoding.causal_mask(2), write_index=16
        )
        outs.append((logits, step_logits, cache))
    (l0, s0, c0), (l1, s1, c1) = outs
    np.testing.assert_allclose(l1, l0, atol=1e-5)
    np.testing.assert_allclose(s1, s0, atol=1e-5)
    assert len(c1.keys) == 3 and c1.keys[0].shape == c0.keys[0].shape
    for a, b in zip(c0.keys + c0.values, c1.keys + c1.values):
        np.testing.assert_allclose(b, a, atol=1e-5)


def _program_size(num_layers, scan, compiled=False):
    model = models.get_model(_config(num_layers=num_layers, scan_layers=scan), VOCAB)
    tokens, t = _inputs()
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0)}, tokens, t)))

    def loss(p):
        return jnp.mean(model.apply(p, tokens, t) ** 2)

    lowered = jax.jit(jax.grad(loss)).lower(params)
    if compiled:  # XLA's program: the unrolled stack's one traced block is inlined at every layer
        return len(re.findall(r" dot\(", lowered.compile().as_text()))
    return len(re.findall(r"stablehlo\.dot_general", lowered.as_text()))


def test_scanned_program_does_not_grow_with_depth():
    """What makes compile time flat: the scanned gradient program has as many matmuls at 8 layers as at 2,
    while the unrolled one, traced once but inlined by XLA at every layer, grows with the depth (the scanned
    programs are only lowered)."""
    assert _program_size(8, scan=True) == _program_size(2, scan=True)
    unrolled_2, unrolled_8 = _program_size(2, False, compiled=True), _program_size(8, False, compiled=True)
    assert unrolled_8 > 3 * unrolled_2 - 10


def test_a_stored_config_without_the_new_fields_builds_the_unrolled_network():
    """Checkpoints store their config: one written before scan_layers/remat_policy existed means unrolled."""
    c = _config()
    old = {k: v for k, v in c.items() if k not in ("scan_layers", "remat_policy")}
    import ml_collections

    model = models.get_model(ml_collections.ConfigDict(old), VOCAB)
    assert model.scan_layers is False and model.remat_policy == "full"
    with pytest.raises(ValueError, match="config.model.remat_policy must be one of"):
        models.get_model(_config(remat_policy="some"), VOCAB)


def test_unrolled_layers_are_traced_once_and_compute_what_per_layer_tracing_does(monkeypatch):
    """The unrolled stack traces one block for all layers (stack.TRACE_BLOCKS_ONCE) and computes the same
    logits and gradients as tracing each layer's Python; the numpy rotary positions stay trace-time constants
    inside the jitted block. Init keeps per-layer tracing: the same initial parameters as always."""
    from ddlm.models import layers

    tokens, t = _inputs()
    weights = jax.random.normal(jax.random.key(2), (*tokens.shape, VOCAB))
    noise = _unrolled_params()
    calls = []
    rotary = layers.rotary_embedding

    def counted(x, positions, *args, **kwargs):
        calls.append(type(positions))
        return rotary(x, positions, *args, **kwargs)

    monkeypatch.setattr(layers, "rotary_embedding", counted)

    def run():
        model = models.get_model(_config(), VOCAB)
        calls.clear()
        params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, tokens, t)["params"])
        init_calls = len(calls)
        perturbed = jax.tree.map(lambda x, y: x + 0.05 * y, params, noise)  # every block matters

        def loss(p):
            logits = model.apply({"params": p}, tokens, t, train=True, rngs={"dropout": jax.random.key(3)})
            return jnp.sum(logits * weights), logits

        jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss, has_aux=True))(perturbed))
        traced = (init_calls, len(calls) - init_calls)
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(perturbed)
        # the timestep sinusoids' cos only: no [1, L, 1, Dh/2] rotary table is computed in the graph
        assert " = cos " in jaxpr and not re.search(r"\[1,16,1,\d+\] = cos ", jaxpr)
        assert set(calls) == {np.ndarray}
        return params, logits, grads, traced

    once = run()
    with monkeypatch.context() as m:
        m.setattr(stack, "TRACE_BLOCKS_ONCE", False)
        each = run()
    assert (once[3], each[3]) == ((6, 2), (6, 6)), (once[3], each[3])  # rotary for q and k: 2 calls a layer
    for a, b in zip(jax.tree.leaves(once[0]), jax.tree.leaves(each[0])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(once[1], each[1], rtol=1e-6, atol=1e-6)
    assert float(jnp.std(once[1])) > 0
    _assert_trees_close(once[2], each[2])


def _assert_trees_close(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b)) or 1.0))


def test_dropout_traced_once_draws_independent_masks_and_computes_what_they_imply(monkeypatch):
    """Dropout under the lifted jit: the block is traced once (not per layer), every layer's two dropout sites
    draw their own Bernoulli(1 - rate) mask from the dropout key (other masks than per-layer tracing draws:
    flax's lifted rngs), the same key the same masks, another key others; and the logits and gradients are
    those of per-layer tracing run with exactly those masks (replayed), so only the draws moved."""
    from ddlm.models import layers

    rate = 0.3
    tokens, t = _inputs()
    weights = jax.random.normal(jax.random.key(2), (*tokens.shape, VOCAB))
    params = _unrolled_params()
    model = models.get_model(_config(dropout=rate), VOCAB)
    dropout_call, rotary = nn.Dropout.__call__, layers.rotary_embedding
    replay, rotary_calls = {}, []

    def dropout(self, inputs, deterministic=None, rng=None):
        if replay:  # per-layer tracing, applying the recorded masks
            return jnp.where(replay[self.scope.path], inputs / (1 - self.rate), 0.0)
        out = dropout_call(self, inputs, deterministic, rng)
        self.sow("intermediates", "kept", out != 0)  # the inputs are nonzero (almost surely)
        return out

    def counted(*args, **kwargs):
        rotary_calls.append(1)
        return rotary(*args, **kwargs)

    monkeypatch.setattr(nn.Dropout, "__call__", dropout)
    monkeypatch.setattr(layers, "rotary_embedding", counted)

    def run(key):
        def loss(p):
            logits, state = model.apply(
                {"params": p}, tokens, t, train=True, rngs={"dropout": jax.random.key(key)},
                mutable=["intermediates"],
            )
            return jnp.sum(logits * weights), (logits, state)

        rotary_calls.clear()
        (_, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        masks = {
            (block, site): np.asarray(kept["kept"][0])
            for block, sites in state.get("intermediates", {}).items()
            for site, kept in sites.items()
        }
        return logits, grads, masks, len(rotary_calls)

    logits, grads, masks, calls = run(3)
    assert calls == 2  # one traced block (rotary for q and k), not 3 layers' worth
    assert sorted(masks) == [(f"block_{i}", f"Dropout_{j}") for i in range(3) for j in range(2)]
    flat = [m.ravel() for m in masks.values()]
    for m in flat:
        assert m.size == 2 * 16 * 32 and abs(m.mean() - (1 - rate)) < 0.06, m.mean()  # std 0.014
    for i in range(len(flat)):
        for j in range(i):  # independent masks agree with probability 0.7^2 + 0.3^2 = 0.58
            assert 0.5 < np.mean(flat[i] == flat[j]) < 0.66, (i, j)
    again, _, masks_again, _ = run(3)
    np.testing.assert_array_equal(logits, again)
    assert all(np.array_equal(masks[k], masks_again[k]) for k in masks)
    _, _, masks_other, _ = run(4)
    assert all(0.5 < np.mean(masks[k] == masks_other[k]) < 0.66 for k in masks)

    replay.update(masks)
    monkeypatch.setattr(stack, "TRACE_BLOCKS_ONCE", False)
    replayed, replayed_grads, _, calls = run(5)  # the key is unused: the recorded masks are applied
    assert calls == 6
    np.testing.assert_allclose(logits, replayed, rtol=1e-6, atol=1e-6)
    _assert_trees_close(grads, replayed_grads)


def test_blocks_configured_otherwise_are_traced_anew(monkeypatch):
    """The traced block is reused across layers, not across networks: a bfloat16-compute network of the same
    shapes traced after a float32 one computes its own (bfloat16) logits, those of per-layer tracing."""
    params = _unrolled_params()
    tokens, t = _inputs()

    def logits(dtype):
        model = models.get_model(_config(dtype=dtype), VOCAB)
        return np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, t))(params), np.float32)

    f32, bf16 = logits("float32"), logits("bfloat16")
    monkeypatch.setattr(stack, "TRACE_BLOCKS_ONCE", False)
    np.testing.assert_array_equal(bf16, logits("bfloat16"))
    np.testing.assert_array_equal(f32, logits("float32"))
    assert np.max(np.abs(bf16 - f32)) > 1e-4
