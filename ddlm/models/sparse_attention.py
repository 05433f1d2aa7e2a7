"""Block-sparse flash attention in Pallas: the kernel behind `attention_impl='pallas'`.

The BD3-LM network attends over concat(xt, x0) (2L tokens) with a mask that is mostly empty: an xt block sees
itself and the clean blocks before it, a clean block sees the clean blocks up to itself, and no clean token sees
xt (`layers.block_diffusion_mask`). The XLA path computes all (2L)^2 scores and masks three quarters of them
away; this kernel cuts queries and keys into tiles and visits only the (query tile, key tile) pairs where the
mask has a True, so its work is the mask's density (28% of the dense work at L = 1024, block 16, 64-token
tiles; `visited_fraction`), and memory is linear in the length (FlashAttention's online softmax, Dao et al.
2022; the backward pass recomputes the probabilities from the saved log-sum-exp, FlashAttention-2).

One kernel serves every mask: the mask is an ordinary bool [T, S] array shared by the batch and the heads;
`tile_tables` lists, per query tile, the key tiles holding a True (and per key tile the query tiles, for the
dK/dV pass), and the kernels loop over those lists. Inside a visited tile the mask is applied element-wise, so
partial tiles (block boundaries that do not fall on tile boundaries, the causal diagonal) are exact.

Written with plain Pallas operations in the style of the Triton backend (jax.experimental.pallas.ops.gpu
.attention, whose structure this follows): it compiles on NVIDIA GPUs, and runs anywhere under the Pallas
interpreter (`interpret=True`, how the tests check it against the XLA path on CPU). TPUs are not supported
(Mosaic needs a different tiling; splash attention is the TPU kernel for this).

Precision: scores, softmax statistics and all accumulators are float32 whatever the input dtype; the outputs and
gradients are returned in the inputs' dtype. A query row with no allowed key has an undefined output (the
networks never build one).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# A large finite negative score for masked entries: exp(_MASK - m) is exactly 0 for any attainable row max m,
# and, unlike -inf, a tile whose row is entirely masked does not produce inf - inf.
_MASK = -0.7 * float(np.finfo(np.float32).max)

DEFAULT_TILE = 64  # query and key tile (rows of the score tile): 64 x 64 fits a GPU SM's shared memory at Dh <= 128
_TILE_CHOICES = (64, 32, 16)


def choose_tile(length: int, tile: int | None = None) -> int:
    """The tile size for a sequence of `length` tokens: `tile` if given, else the largest of 64, 32, 16 dividing
    it. Raises a one-line ValueError when none does (Triton needs tiles of at least 16 rows)."""
    if tile is not None:
        if tile <= 0 or length % tile:
            raise ValueError(f"attention tile {tile} must be positive and divide the sequence length {length}")
        return tile
    for choice in _TILE_CHOICES:
        if length % choice == 0:
            return choice
    raise ValueError(
        f"attention_impl='pallas' needs the attended length ({length}) to be a multiple of 16; "
        "use attention_impl='xla' or a seq_len that is a multiple of 16 (8 with the BD3-LM 2L input)"
    )


def _tile_any(mask: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """bool [T/block_q, S/block_k]: which (query tile, key tile) pairs hold at least one True."""
    t, s = mask.shape
    return mask.reshape(t // block_q, block_q, s // block_k, block_k).any(axis=(1, 3))


def _table(tiles: jax.Array) -> jax.Array:
    """int32 [rows, cols + 1]: column 0 = how many tiles of the row hold a True, then their indices in
    increasing order (the rest of the row repeats indices that are never visited)."""
    order = jnp.argsort(~tiles, axis=1, stable=True).astype(jnp.int32)
    return jnp.concatenate([tiles.sum(axis=1, dtype=jnp.int32)[:, None], order], axis=1)


def tile_tables(mask: jax.Array, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """(per query tile its key tiles, per key tile its query tiles) for a bool [T, S] mask; see `_table`."""
    tiles = _tile_any(mask, block_q, block_k)
    return _table(tiles), _table(tiles.T)


def visited_fraction(mask, block_q: int = DEFAULT_TILE, block_k: int = DEFAULT_TILE) -> float:
    """The fraction of the dense [T, S] score tiles the kernel computes for `mask` (its share of the work)."""
    tiles = np.asarray(_tile_any(jnp.asarray(mask, bool), block_q, block_k))
    return float(tiles.mean())


# ---- kernels: grid (tile, batch, head); refs hold one head's [length, head_dim] rows -----------------------


def _nt(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):
    """a @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
    """a.T @ b with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _listed_tile(table_ref, j, size):
    """The j-th tile listed in a kernel's table row (see `_table`), as a slice of `size` rows."""
    return pl.ds(pl.multiple_of(table_ref[j + 1] * size, size), size)


def _scores(q, k, mask_tile, scale):
    """float32 scores q k^T * scale of one tile, _MASK where the int8 mask tile is 0."""
    return jnp.where(mask_tile != 0, _nt(q, k) * scale, _MASK)


def _forward_kernel(table_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale):
    q = q_ref[...]
    block_q, head_dim = q.shape

    def visit(j, carry):
        acc, m_prev, l_prev = carry
        keys = _listed_tile(table_ref, j, block_k)
        s = _scores(q, k_ref[keys, :], mask_ref[:, keys], scale)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        p = jnp.exp(s - m_next[:, None])
        correction = jnp.exp(m_prev - m_next)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + _nn(p.astype(v.dtype), v)
        return acc, m_next, correction * l_prev + p.sum(axis=1)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, table_ref[0], visit, init)
    l = jnp.where(l == 0.0, 1.0, l)  # a query tile with no key tile at all (undefined rows): 0, not NaN
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(table_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_k, scale):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def visit(j, dq):
        keys = _listed_tile(table_ref, j, block_k)
        k = k_ref[keys, :]
        p = jnp.exp(_scores(q, k, mask_ref[:, keys], scale) - lse[:, None])
        ds = p * (_nt(do, v_ref[keys, :]) - delta[:, None])
        return dq + _nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, table_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    table_ref, mask_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, scale
):
    k, v = k_ref[...], v_ref[...]

    def visit(j, carry):
        dk, dv = carry
        queries = _listed_tile(table_ref, j, block_q)
        q, do = q_ref[queries, :], do_ref[queries, :]
        p = jnp.exp(_scores(q, k, mask_ref[queries, :], scale) - lse_ref[queries][:, None])  # [block_q, block_k]
        dv = dv + _tn(p.astype(do.dtype), do)
        ds = p * (_nt(do, v) - delta_ref[queries][:, None])
        return dk + _tn(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, table_ref[0], visit, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params():
    from jax.experimental.pallas import triton as plgpu  # GPU-only module: imported when used

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


# Index maps of the grid (tile i, example b, head h): a tile of rows of one head, all rows of one head, a tile
# or all of one head's softmax statistics [B, H, T], and row i of a tile table.
def _tile_rows(i, b, h):
    return b, i, h, 0


def _all_rows(i, b, h):
    return b, 0, h, 0


def _tile_stats(i, b, h):
    return b, h, i


def _all_stats(i, b, h):
    return b, h, 0


def _table_row(i, b, h):
    return i, 0


def _query_tile_inputs(table, block_q, s, head_dim):
    """BlockSpecs of (table, mask, q, k, v) for a grid over query tiles (the forward and dQ kernels): the
    tile's table row and mask rows, its query rows, all key and value rows of its (batch, head)."""
    return [
        pl.BlockSpec((None, table.shape[1]), _table_row),
        pl.BlockSpec((block_q, s), _table_row),
        pl.BlockSpec((None, block_q, None, head_dim), _tile_rows),
        pl.BlockSpec((None, s, None, head_dim), _all_rows),
        pl.BlockSpec((None, s, None, head_dim), _all_rows),
    ]


def _forward(q, k, v, mask, table, block_q, block_k, interpret):
    batch, t, heads, head_dim = q.shape
    s = k.shape[1]
    return pl.pallas_call(
        functools.partial(_forward_kernel, block_k=block_k, scale=1.0 / math.sqrt(head_dim)),
        grid=(t // block_q, batch, heads),
        in_specs=_query_tile_inputs(table, block_q, s, head_dim),
        out_specs=[
            pl.BlockSpec((None, block_q, None, head_dim), _tile_rows),
            pl.BlockSpec((None, None, block_q), _tile_stats),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, t), jnp.float32),
        ],
        compiler_params=None if interpret else _compiler_params(),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(table, mask, q, k, v)


def _backward(q, k, v, mask, table, table_t, out, lse, do, block_q, block_k, interpret):
    batch, t, heads, head_dim = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    params = None if interpret else _compiler_params()
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, scale=scale),
        grid=(t // block_q, batch, heads),
        in_specs=[
            *_query_tile_inputs(table, block_q, s, head_dim),
            pl.BlockSpec((None, block_q, None, head_dim), _tile_rows),  # dO, then lse and delta
            pl.BlockSpec((None, None, block_q), _tile_stats),
            pl.BlockSpec((None, None, block_q), _tile_stats),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, head_dim), _tile_rows),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(table, mask, q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q, scale=scale),
        grid=(s // block_k, batch, heads),
        in_specs=[
            pl.BlockSpec((None, table_t.shape[1]), _table_row),
            pl.BlockSpec((t, block_k), lambda i, b, h: (0, i)),  # the key tile's columns of the mask
            pl.BlockSpec((None, block_k, None, head_dim), _tile_rows),
            pl.BlockSpec((None, block_k, None, head_dim), _tile_rows),
            pl.BlockSpec((None, t, None, head_dim), _all_rows),
            pl.BlockSpec((None, t, None, head_dim), _all_rows),
            pl.BlockSpec((None, None, t), _all_stats),
            pl.BlockSpec((None, None, t), _all_stats),
        ],
        out_specs=[
            pl.BlockSpec((None, block_k, None, head_dim), _tile_rows),
            pl.BlockSpec((None, block_k, None, head_dim), _tile_rows),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(table_t, mask, k, v, q, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, mask, table, table_t, block_q, block_k, interpret):
    return _forward(q, k, v, mask, table, block_q, block_k, interpret)[0]


def _attention_fwd(q, k, v, mask, table, table_t, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, mask, table, block_q, block_k, interpret)
    return out, (q, k, v, mask, table, table_t, out, lse)


def _attention_bwd(block_q, block_k, interpret, residuals, do):
    q, k, v, mask, table, table_t, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, mask, table, table_t, out, lse, do, block_q, block_k, interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, mask=None, *, is_causal=False, block_q=None, block_k=None, interpret=False):
    """Softmax attention that computes only the tiles where `mask` allows something (differentiable).

    Args:
      q: [B, T, H, Dh] queries; k, v: [B, S, K, Dh] keys and values, K dividing H (grouped-query attention:
        query head h reads key/value head h // (H / K), as `layers.attention`).
      mask: bool [T, S] (True = attend), the same for every example and head; None = all True.
      is_causal: also require key position <= query position.
      block_q, block_k: tile sizes (default: the largest of 64, 32, 16 dividing T, resp. S).
      interpret: run under the Pallas interpreter (any backend; slow: for tests and debugging).

    Returns:
      [B, T, H, Dh] in q's dtype: softmax(q k^T / sqrt(Dh), masked) v.
    """
    t, heads, head_dim = q.shape[1:]
    s = k.shape[1]
    if heads % k.shape[2]:
        raise ValueError(f"key/value heads ({k.shape[2]}) must divide query heads ({heads})")
    block_q, block_k = choose_tile(t, block_q), choose_tile(s, block_k)
    if not interpret:  # Triton loads and stores only power-of-two sized tiles
        for name, size in (("head_dim", head_dim), ("block_q", block_q), ("block_k", block_k)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"attention_impl='pallas' needs {name} to be a power of two >= 16, got {size}")
    if mask is None:
        mask = jnp.ones((t, s), bool)
    mask = jnp.asarray(mask, bool)
    if mask.shape != (t, s):
        raise ValueError(f"block_sparse_attention: mask must be bool [{t}, {s}], got {mask.shape}")
    if is_causal:
        mask = mask & jnp.tril(jnp.ones((t, s), bool))
    groups = heads // k.shape[2]
    if groups > 1:  # the gradient of the repeat sums over each group
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    table, table_t = tile_tables(mask, block_q, block_k)
    return _attention(q, k, v, mask.astype(jnp.int8), table, table_t, block_q, block_k, interpret)
