"""ddlm/models/sparse_attention.py: the block-sparse Pallas attention kernel (run by the Pallas interpreter on
CPU) against XLA's dense attention — values and gradients, every mask kind the networks build, grouped-query
heads, bfloat16 — its tile tables against a brute-force count, and the BD3-LM network with
attention_impl='pallas_interpret' against 'xla' under an 8-device mesh (the kernel runs per shard)."""

import unittest.mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddlm import models, sharding
from ddlm.models import layers, sparse_attention, stack

pytestmark = pytest.mark.timeout(600)


def _qkv(batch=2, length=64, heads=2, kv_heads=None, head_dim=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    kv_heads = kv_heads or heads

    def draw(h):
        return jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), dtype)

    return draw(heads), draw(kv_heads), draw(kv_heads), jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)))


def _random_mask(length, density, seed):
    """A random mask with the diagonal always allowed (no query row without a key)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.uniform(size=(length, length)) < density) | np.eye(length, dtype=bool))


MASKS = {
    # name: (length, mask or None, is_causal)
    "bd3lm_block4": (64, lambda: layers.block_diffusion_mask(32, 4), False),
    "bd3lm_block8_tile_straddles": (48, lambda: layers.block_diffusion_mask(24, 8), False),
    "causal": (48, lambda: None, True),
    "bidirectional": (32, lambda: None, False),
    "random_sparse": (64, lambda: _random_mask(64, 0.05, 1), False),
}


def _loss_and_grads(fn, q, k, v, cotangent):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v), jax.jit(fn)(q, k, v)


@pytest.mark.parametrize("name", list(MASKS))
def test_kernel_matches_xla_attention_values_and_gradients(name):
    length, make_mask, is_causal = MASKS[name]
    mask = make_mask()
    q, k, v, cotangent = _qkv(length=length, seed=len(name))

    def kernel(q, k, v):
        return sparse_attention.block_sparse_attention(
            q, k, v, mask, is_causal=is_causal, block_q=16, block_k=16, interpret=True
        )

    def dense(q, k, v):
        return layers.attention(q, k, v, None if mask is None else mask[None, None], is_causal, "xla")

    (loss, grads), out = _loss_and_grads(kernel, q, k, v, cotangent)
    (ref_loss, ref_grads), ref_out = _loss_and_grads(dense, q, k, v, cotangent)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for grad, ref, label in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5, err_msg=f"d{label}")


def test_grouped_query_heads_and_rectangular_tiles():
    """Four query heads reading two key/value heads (the gradient sums over each group), 16 x 32 tiles."""
    mask = layers.block_diffusion_mask(32, 4)
    q, k, v, cotangent = _qkv(heads=4, kv_heads=2, seed=3)

    def kernel(q, k, v):
        return sparse_attention.block_sparse_attention(q, k, v, mask, block_q=16, block_k=32, interpret=True)

    def dense(q, k, v):
        return layers.attention(q, k, v, mask[None, None], False, "xla")

    (_, grads), out = _loss_and_grads(kernel, q, k, v, cotangent)
    (_, ref_grads), ref_out = _loss_and_grads(dense, q, k, v, cotangent)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        assert grad.shape == ref.shape
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    """bfloat16 in and out, float32 inside: as close to the float32 result as XLA's own bfloat16 attention."""
    mask = layers.block_diffusion_mask(32, 4)
    q, k, v, _ = _qkv(seed=4)
    exact = layers.attention(q, k, v, mask[None, None], False, "xla")
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = sparse_attention.block_sparse_attention(q16, k16, v16, mask, block_q=16, block_k=16, interpret=True)
    xla16 = layers.attention(q16, k16, v16, mask[None, None], False, "xla")
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
    xla_err = float(jnp.max(jnp.abs(xla16.astype(jnp.float32) - exact)))
    assert err <= max(2 * xla_err, 1e-2), (err, xla_err)


def _brute_force_tiles(mask, block_q, block_k):
    mask = np.asarray(mask)
    rows, cols = mask.shape[0] // block_q, mask.shape[1] // block_k
    return np.array(
        [[mask[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any() for j in range(cols)]
         for i in range(rows)]
    )  # fmt: skip


@pytest.mark.parametrize("seq_len,block_size,tile", [(64, 4, 16), (96, 16, 32), (48, 8, 16)])
def test_tile_tables_list_exactly_the_tiles_holding_an_allowed_pair(seq_len, block_size, tile):
    mask = layers.block_diffusion_mask(seq_len, block_size)
    tiles = _brute_force_tiles(mask, tile, tile)
    table, table_t = (np.asarray(t) for t in sparse_attention.tile_tables(mask, tile, tile))
    for expected, got in ((tiles, table), (tiles.T, table_t)):
        for row, listing in zip(expected, got):
            count = listing[0]
            assert count == row.sum()
            assert list(listing[1 : 1 + count]) == list(np.flatnonzero(row))


def test_bd3lm_mask_visits_about_a_quarter_of_the_tiles():
    """At L = 1024 with 16-token blocks and 64-token tiles the kernel computes 288 of 32 x 32 tiles."""
    mask = layers.block_diffusion_mask(1024, 16)
    assert sparse_attention.visited_fraction(mask) == pytest.approx(288 / 1024)
    assert sparse_attention.visited_fraction(jnp.ones((256, 256), bool)) == 1.0


def _bd3lm_config(impl):
    c = models.default_config("tiny")
    c.name = "bd3lm"
    c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.cond_dim, c.block_size = 2, 32, 2, 64, 16, 4
    c.attention_impl = impl
    return c


def test_bd3lm_network_with_the_kernel_matches_xla_under_a_mesh():
    """The whole BD3-LM network, 'pallas_interpret' vs 'xla', batch and heads split over 8 devices (the kernel
    runs once per shard under shard_map): logits and parameter gradients agree."""
    vocab, batch, length = 29, 8, 16
    rng = np.random.default_rng(0)
    xt = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    x0 = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    t = jnp.asarray(rng.uniform(0.1, 0.9, batch), jnp.float32)
    xla_model = models.get_model(_bd3lm_config("xla"), vocab)
    kernel_model = models.get_model(_bd3lm_config("pallas_interpret"), vocab)
    params = nn.meta.unbox(jax.jit(lambda: xla_model.init(jax.random.key(0), xt, t, x0=x0))()["params"])
    leaves, treedef = jax.tree.flatten(params)  # away from the adaLN zero init, so attention matters
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    def loss_fn(model):
        def loss(params):
            logits = model.apply({"params": params}, xt, t, x0=x0)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x0[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))

    ref_loss, ref_grads = loss_fn(xla_model)(params)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    with sharding.mesh_context(mesh):
        loss, grads = loss_fn(kernel_model)(params)
        # each layer's Python traced (not one block for both) so that each layer shows in the lowered text
        with unittest.mock.patch.object(stack, "TRACE_BLOCKS_ONCE", False):
            hlo = jax.jit(lambda p: kernel_model.apply({"params": p}, xt, t, x0=x0)).lower(params).as_text()
    assert hlo.count("sdy.manual_computation") == 2  # one per layer: the kernel ran per shard
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_pallas_on_cpu_and_unknown_kernels_are_one_line_errors():
    xt = jnp.zeros((2, 16), jnp.int32)
    t = jnp.full((2,), 0.5)
    model = models.get_model(_bd3lm_config("pallas"), 29)
    with pytest.raises(ValueError, match="attention_impl='pallas' .* needs an NVIDIA GPU") as info:
        model.init(jax.random.key(0), xt, t, x0=xt)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        models.get_model(_bd3lm_config("flash"), 29).init(jax.random.key(0), xt, t, x0=xt)
    with pytest.raises(ValueError, match="multiple of 16"):
        q = jnp.zeros((1, 40, 2, 16))
        sparse_attention.block_sparse_attention(q, q, q, interpret=True)
    with pytest.raises(ValueError, match="head_dim to be a power of two"):
        q = jnp.zeros((1, 32, 2, 24))
        sparse_attention.block_sparse_attention(q, q, q)
