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


def _program_size(num_layers, scan):
    model = models.get_model(_config(num_layers=num_layers, scan_layers=scan), VOCAB)
    tokens, t = _inputs()
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0)}, tokens, t)))

    def loss(p):
        return jnp.mean(model.apply(p, tokens, t) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    return len(re.findall(r"stablehlo\.dot_general", hlo))


def test_scanned_program_does_not_grow_with_depth():
    """What makes compile time flat: the scanned gradient program has as many matmuls at 8 layers as at 2,
    while the unrolled one grows with the depth (lowering only, no compile)."""
    assert _program_size(8, scan=True) == _program_size(2, scan=True)
    unrolled_2, unrolled_8 = _program_size(2, scan=False), _program_size(8, scan=False)
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
