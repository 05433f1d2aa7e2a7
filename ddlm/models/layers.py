"""Building blocks of the diffusion transformer (DiT/DDiT as in MDLM and SEDD) and its causal twins.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and activations are constrained
(`nn.with_logical_constraint`) at block boundaries; the trainer maps the names to mesh axes with one rule table.
The names used here:

    'batch'   examples in a batch                       (activations)
    'length'  sequence positions                        (activations)
    'embed'   the model width d_model                   (parameters and activations)
    'mlp'     the MLP hidden width mlp_dim              (parameters and activations)
    'heads'   attention heads                           (parameters and activations)
    'kv'      the per-head width d_model // num_heads   (parameters and activations)
    'vocab'   the vocabulary                            (parameters and logits)

Small conditioning parameters (timestep MLP, cond_dim axes) are named None: replicated.

Numerics: parameters in `param_dtype` (float32), matmuls in `dtype` (bfloat16 or float32), the residual
stream, LayerNorm, rotary and adaLN modulation in float32; logits are float32. A float64 network (dtype and
param_dtype float64, under `jax.enable_x64`) keeps all of these in float64: the exactness tests of the KV
cache compare float64 logits, where float32 rounding would hide a wrong formula.
"""

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddlm.models import sparse_attention

Dtype = Any

# attention_impl values: XLA's attention (any backend), cuDNN's fused attention (NVIDIA GPUs, bfloat16), the
# block-sparse Pallas kernel (NVIDIA GPUs) and the same kernel under the Pallas interpreter (any backend, slow).
ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "pallas_interpret")
PALLAS_IMPLS = ("pallas", "pallas_interpret")

# Activation layouts at block boundaries.
BLE = ("batch", "length", "embed")
BLHK = ("batch", "length", "heads", "kv")
BLM = ("batch", "length", "mlp")
BLV = ("batch", "length", "vocab")


def stream_dtype(dtype: Dtype):
    """The dtype of the residual stream, norms and logits: float32, or float64 for a float64 network."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _lecun_normal(in_axis=-2, out_axis=-1):
    """Fan-in scaled normal init (flax's Dense default) for kernels with several input or output axes."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


# Multi-axis kernels are created with self.param + einsum rather than nn.DenseGeneral: DenseGeneral initialises
# a flattened rank-2 kernel, and flax then applies the rank-N logical constraint to it under a mesh (an error).


def mesh_split(logical_axis: str) -> int:
    """How many ways the ambient mesh splits arrays along `logical_axis` under the logical axis rules in
    effect (1 outside a mesh, or where the name maps to no mesh axis or to axes of size 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((logical_axis,))[0]
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


# ------------------------------------------------------------------------------------------------------------
# Projections: x [..., *in] . kernel [*in, *out], with the weight gradient in the layout XLA:CPU's fast dot takes.
# ------------------------------------------------------------------------------------------------------------


def transposed_weight_grads() -> bool:
    """Whether `project` computes weight gradients from a materialised transpose (on CPU; see there)."""
    return jax.default_backend() == "cpu"


def project(x: jax.Array, kernel: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """Contracts the last `n_in` axes of x with the first `n_in` axes of kernel: [..., *in] -> [..., *out].

    The value is `lax.dot_general`'s; on CPU its gradient is arranged for XLA:CPU's fast dot. The weight
    gradient x^T g contracts the batch x length axis, which is the major axis of both x [n, in] and the
    cotangent g [n, out]; XLA:CPU hands a dot to YNNPACK only when its left operand contracts its minor axis,
    so written plainly these products run through Eigen at about half the rate (in the peers' tiny step,
    ~90 of ~540 ms). Here the product is a custom JVP whose kernel tangent, once transposed into the weight
    gradient, multiplies a transposed copy, kept by optimisation barriers (XLA would fold a bare transpose
    back into the dot): of x when the input is the narrower side, [in, n] @ g; else of g, (g^T [out, n] @ x)^T.
    Measured with `benchmarks/step_ab.py`: the tiny peers' step 1.18x faster, small 1.06x. A custom JVP, not
    a custom VJP, so forward-mode derivatives (jvp, Hessians) still work. Other backends, whose matmul units
    read transposed operands for free, get the plain product.
    """
    n_lead = x.ndim - n_in
    if not transposed_weight_grads() or n_lead < 1:
        dims = ((tuple(range(n_lead, x.ndim)), tuple(range(n_in))), ((), ()))
        return jax.lax.dot_general(x, kernel, dims, preferred_element_type=preferred_element_type)
    size_in = math.prod(kernel.shape[:n_in])
    y = _matmul_transposed_grad(x.reshape(-1, size_in), kernel.reshape(size_in, -1), preferred_element_type)
    return y.reshape(x.shape[:n_lead] + kernel.shape[n_in:])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul_transposed_grad(x, kernel, preferred_element_type):
    """x [n, in] @ kernel [in, out]; its derivative in the kernel reads a materialised transpose (`project`)."""
    return jnp.matmul(x, kernel, preferred_element_type=preferred_element_type)


@_matmul_transposed_grad.defjvp
def _matmul_transposed_grad_jvp(preferred_element_type, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _matmul_transposed_grad(x, kernel, preferred_element_type)
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=preferred_element_type)
    barrier = jax.lax.optimization_barrier
    if kernel.shape[0] <= kernel.shape[1]:
        # x_t [in, n], a residual of the forward pass; transposed, the kernel term is the weight gradient
        # x_t @ g. XLA fuses x's elementwise producer into the transposing loop (a barrier does not stop it),
        # which then recomputes it in transposed order: the reason the narrower side is the one transposed
        # (the tiny MLP's [2048, 1024] GELU output took 26-32 ms that way, its [2048, 256] cotangent ~1 ms).
        x_t = barrier(x.T)
        dy_kernel = dot(x_t, dkernel, (((0,), (0,)), ((), ())))
    else:
        # The transpose of the program dW = (barrier(g^T) @ x)^T, written forward: a barrier transposes to
        # a barrier, a transpose to a transpose, and the product to g^T [out, n] @ x [n, in].
        a = barrier(dkernel.T)  # [out, in]
        dy_kernel = barrier(dot(a, x, (((1,), (1,)), ((), ())))).T  # [out, n] -> [n, out]
    dy = jnp.matmul(dx, kernel, preferred_element_type=preferred_element_type) + dy_kernel
    return y, dy.astype(y.dtype)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for nn.Dense (`dot_general=`): its contraction, through `project`."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    n_in = len(contract_lhs)
    dense = (tuple(contract_lhs), tuple(contract_rhs)) == (tuple(range(lhs.ndim - n_in, lhs.ndim)), tuple(range(n_in)))
    if dense and batch == ((), ()) and precision is None:
        return project(lhs, rhs, n_in, preferred_element_type)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


# ------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, RoFormer), GPT-NeoX "rotate half" layout as in MDLM's models/dit.py.
# ------------------------------------------------------------------------------------------------------------


ROPE_SCALINGS = ("", "linear", "llama3")


def rotary_inv_freq(half: int, base: float, scaling: tuple = (), dtype=jnp.float32) -> jax.Array:
    """The rotary frequencies base^(-k / half), k < half: [half] in dtype.

    scaling: () for plain rotary, or (kind, factor, low_freq_factor, high_freq_factor, original_max_positions)
    with kind 'linear' (every frequency / factor: positions interpolated) or 'llama3' (LLaMA 3.1's: wavelengths
    longer than original / low_freq_factor are divided by factor, shorter than original / high_freq_factor kept,
    the band between interpolated; `_compute_llama3_parameters` of transformers' modeling_rope_utils).
    """
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=dtype) / half))
    if not scaling or not scaling[0]:
        return inv_freq
    kind, factor, low, high, original = scaling
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rotary scaling must be one of {ROPE_SCALINGS}, got {kind!r}")
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_embedding(
    x: jax.Array, positions: jax.Array, base: float = 10_000.0, scaling: tuple = ()
) -> jax.Array:
    """Rotates query or key vectors by their positions.

    Args:
      x: [batch, length, heads, head_dim] queries or keys (head_dim even).
      positions: [length] or [batch, length] integer or float positions.
      base: the frequency base.
      scaling: frequency scaling (`rotary_inv_freq`); () = none.

    Returns:
      [batch, length, heads, head_dim] in x's dtype; computed in float32 (float64 for float64 x). For any s,
      <rot(q, m + s), rot(k, n + s)> = <rot(q, m), rot(k, n)>: scores depend on m - n only.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    compute = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 for float64 x
    # numpy positions (the full forward pass's 0..L-1) give constant tables, as MDLM's cached cos/sin: built in
    # the graph, XLA:CPU fuses them into the rotation and evaluates cos and sin once per element of x (per
    # example and head), ~15 ms of the peers' small step per layer. The same jnp operations either way.
    if isinstance(positions, np.ndarray):
        key = (positions.dtype.str, positions.shape, positions.tobytes())
        cos, sin = _constant_rotary_tables(key, half, float(base), tuple(scaling), jnp.dtype(compute).name)
    else:
        cos, sin = _rotary_tables(positions, half, base, scaling, compute)
    x32 = x.astype(compute)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _rotary_tables(positions, half: int, base: float, scaling: tuple, compute):
    """cos and sin of positions x rotary_inv_freq: [B|1, L, 1, half] each, in `compute`."""
    inv_freq = rotary_inv_freq(half, base, scaling, compute)  # [half]
    positions = jnp.asarray(positions, compute)
    if positions.ndim == 1:
        positions = positions[None]  # [1, L]
    angles = positions[..., None] * inv_freq  # [B|1, L, half]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


@functools.lru_cache(maxsize=64)
def _constant_rotary_tables(positions_key: tuple, half: int, base: float, scaling: tuple, compute: str):
    """`_rotary_tables` of numpy positions (dtype, shape, bytes), evaluated at trace time and kept: every layer
    of a network reads the same tables, so tracing computes them once (24 evaluations of a dozen eager ops
    were ~1.1 s of tracing the peers' small train step)."""
    dtype, shape, data = positions_key
    positions = np.frombuffer(data, dtype=dtype).reshape(shape)
    with jax.ensure_compile_time_eval():
        return _rotary_tables(positions, half, base, scaling, jnp.dtype(compute))


# ------------------------------------------------------------------------------------------------------------
# Attention masks.
# ------------------------------------------------------------------------------------------------------------


def block_diffusion_mask(seq_len: int, block_size: int) -> jax.Array:
    """The BD3-LM attention mask of the 2L-input trick (Arriola et al. 2025, "Block Diffusion", Sec. 3 / Fig. 2).

    The network input is concat(xt, x0) of length 2L; positions [0, L) are the noised sequence xt and
    [L, 2L) the clean sequence x0, both split into blocks of `block_size` tokens. With b(i) the block of i:
      xt query block b attends xt block b (bidirectional within the block) and x0 blocks < b;
      x0 query block b attends x0 blocks <= b (block-causal) and never xt.

    Args:
      seq_len: L, a multiple of block_size.
      block_size: tokens per block.

    Returns:
      bool [2L, 2L], mask[q, k] True where query q may attend key k.
    """
    if block_size <= 0 or seq_len % block_size:
        raise ValueError(f"block_size must divide seq_len={seq_len}, got block_size={block_size}")
    idx = jnp.arange(2 * seq_len)
    is_x0 = idx >= seq_len
    block = (idx % seq_len) // block_size
    q_x0, k_x0 = is_x0[:, None], is_x0[None, :]
    q_blk, k_blk = block[:, None], block[None, :]
    xt_to_xt = ~q_x0 & ~k_x0 & (q_blk == k_blk)
    xt_to_x0 = ~q_x0 & k_x0 & (k_blk < q_blk)
    x0_to_x0 = q_x0 & k_x0 & (k_blk <= q_blk)
    return xt_to_xt | xt_to_x0 | x0_to_x0


def annealed_causal_mask(rng, length: int, ratio) -> jax.Array:
    """DiffuLLaMA's attention-mask annealing (Gong et al. 2025, "Scaling Diffusion Language Models via
    Adaptation from Autoregressive Models", Sec. 3.2; `get_anneal_attn_mask` of HKUNLP/DiffuLLaMA): the causal
    mask OR'ed with i.i.d. Bernoulli(ratio) entries, so that the attention of an adapted AR model opens up
    gradually: ratio = 0 is causal, ratio = 1 bidirectional.

    Args:
      rng: key of this step's draw (one mask for the whole batch, as DiffuLLaMA).
      length: L.
      ratio: float [] in [0, 1], the probability that a future key is visible.

    Returns:
      bool [L, L], mask[q, k] True where query q may attend key k (always for k <= q).
    """
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal | jax.random.bernoulli(rng, ratio, (length, length))


# ------------------------------------------------------------------------------------------------------------
# Time conditioning.
# ------------------------------------------------------------------------------------------------------------


def timestep_sinusoids(
    t: jax.Array, dim: int = 256, max_period: float = 10_000.0, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Sinusoidal features of a (continuous) time, as DiT/MDLM's TimestepEmbedder.

    Args:
      t: [...] float times.
      dim: number of features (even).

    Returns:
      [..., dim] in dtype (float32): [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim/2)).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / half)
    args = jnp.asarray(t, dtype)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoids(1000 t) -> Dense -> SiLU -> Dense -> SiLU: the conditioning vector c of size cond_dim.

    The trailing SiLU is MDLM's `c = F.silu(self.sigma_map(sigma))`. Times in [0, 1] are scaled by 1000
    (the DiT convention) so that the sinusoid frequencies resolve them.
    """

    cond_dim: int
    frequency_dim: int = 256
    time_scale: float = 1000.0
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32  # float32 (float64 only for a float64 network)

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """t: [batch] or [batch, length] float -> c: [batch, cond_dim] or [batch, length, cond_dim] float32."""
        h = timestep_sinusoids(t * self.time_scale, self.frequency_dim, dtype=self.dtype)
        for i in range(2):
            h = nn.Dense(
                self.cond_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                name=f"dense_{i}",
            )(h)
            h = nn.silu(h)
        return h


class AdaLNModulation(nn.Module):
    """c -> `num` zero-initialised modulation vectors of width d_model (adaLN-zero, Peebles & Xie 2023).

    MDLM's DDiTBlock uses num=6 (shift/scale/gate for attention and MLP), its final layer num=2 (shift/scale).
    """

    num: int
    d_model: int
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32  # float32 (float64 only for a float64 network)

    @nn.compact
    def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
        """c: [batch, 1 or length, cond_dim] -> `num` arrays [batch, 1 or length, d_model] float32."""
        zeros = nn.initializers.zeros
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(zeros, (None, None, "embed")),
            (c.shape[-1], self.num, self.d_model),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(zeros, (None, "embed")),
            (self.num, self.d_model),
            self.param_dtype,
        )
        # [B, 1|L, cond_dim] x [cond_dim, num, d] -> [B, 1|L, num, d]
        mod = jnp.einsum("blc,cnd->blnd", c.astype(self.dtype), kernel.astype(self.dtype)) + bias
        return tuple(mod[..., i, :] for i in range(self.num))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale) + shift


def layer_norm(
    name: str, param_dtype: Dtype, dtype: Dtype = jnp.float32, use_bias: bool = False
) -> nn.LayerNorm:
    # MDLM's LayerNorm: scale only, no bias, statistics and output in float32 (float64 for a float64 network).
    # use_bias: GPT-2's (scale and bias).
    return nn.LayerNorm(
        epsilon=1e-5,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


# ------------------------------------------------------------------------------------------------------------
# Attention and MLP.
# ------------------------------------------------------------------------------------------------------------


class LayerCache(NamedTuple):
    """One layer's keys and values, [batch, capacity, heads, head_dim] each (keys already rotated)."""

    keys: jax.Array
    values: jax.Array


class KVCache(NamedTuple):
    """The network's KV cache: per layer, keys and values [batch, capacity, heads, head_dim] (keys rotated).

    A plain pytree: a lax loop carry, updated in place by `Transformer.decode` writes.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


class DecodeMasks(NamedTuple):
    """Who a query slice of S positions attends to in a cached step (shared by every layer).

    attend: bool [B|1, S, C], cache slots each query sees (the cache as it was before this step).
    self_attend: bool [B|1, S, S], the slice's own fresh keys each query sees.
    write_index: None (the cache is not changed), int32 [] or int32 [B] (a slot per row: speculative
      decoding's rows advance by different amounts): the slice's keys/values are written at slots
      [write_index, write_index + S), replacing what was there (`attend` on those slots is then ignored).
    """

    attend: jax.Array
    self_attend: jax.Array
    write_index: jax.Array | None


def attention(q, k, v, mask, is_causal=False, implementation="xla"):
    """softmax(q k^T / sqrt(Dh), masked) v. q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: bool [B|1, 1, T, S].

    K = H is multi-head attention; K < H (K dividing H) is grouped-query attention (Ainslie et al. 2023):
    query head h reads key/value head h // (H / K), the grouping of jax.nn.dot_product_attention and of
    Hugging Face's `repeat_kv`.

    implementation: 'xla' / 'cudnn' go to jax.nn.dot_product_attention for float32/bfloat16 (the training
    path), except 'xla' on CPU, which takes `_cpu_attention` (the same numerics, arranged for XLA:CPU);
    jax's takes the softmax in float32 even for float64 inputs, so a float64 network (exactness tests) gets
    the same formula written out. 'pallas' / 'pallas_interpret': the block-sparse kernel of
    ddlm/models/sparse_attention.py (computes only the tiles the mask allows; the mask must be shared by the
    batch).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"key/value heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if implementation in PALLAS_IMPLS:
        return _pallas_attention(q, k, v, mask, is_causal, interpret=implementation == "pallas_interpret")
    if q.dtype != jnp.float64:
        if implementation == "xla" and cpu_attention():
            return _cpu_attention(q, k, v, mask, is_causal)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
        )
    k, v, mask = _dense_operands(q, k, v, mask, is_causal)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _dense_operands(q, k, v, mask, is_causal):
    """(k, v, mask) for attention written out: grouped key/value heads repeated to the query heads, is_causal
    folded into the boolean mask ([B|1, 1, T, S], or None)."""
    if q.shape[2] != k.shape[2]:
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = causal if mask is None else mask & causal
    return k, v, mask


def cpu_attention() -> bool:
    """Whether `attention(implementation='xla')` takes ddlm's CPU path (`_cpu_attention`) for float32/bfloat16."""
    return jax.default_backend() == "cpu"


# Independent batch chunks of the CPU attention (see `_cpu_attention`): 2 on 2 cores steps as fast as 4 (small 1.00x,
# tiny 1.05x, `benchmarks/step_ab.py`) and compiles fewer attention graphs (benchmarks/RESULTS.md, issue 28).
CPU_ATTENTION_CHUNKS = 2


def _cpu_attention(q, k, v, mask, is_causal):
    """`jax.nn.dot_product_attention`'s XLA attention (float32 logits and softmax, probabilities cast to the
    value dtype), written for XLA:CPU: its batched products (one [T, Dh] x [Dh, S] matrix per example and head)
    run on one thread each in YNNPACK, so the batch is cut into up to `CPU_ATTENTION_CHUNKS` independent
    chunks that XLA's executor runs side by side; and the derivative is `_attention_core`'s custom JVP (the
    softmax's written out, the probabilities saved once). The peers' small attention (8 x 256 tokens, 12 heads
    of 64) forward + backward: 92 -> 56 ms a layer. The chunks stay whole when the batch is split over
    devices (`mesh_split('batch')`), where a chunk of a sharded axis would move data between devices.
    """
    k, v, mask = _dense_operands(q, k, v, mask, is_causal)
    batch = q.shape[0]
    chunks = 1
    if mesh_split("batch") == 1:
        chunks = max(n for n in range(1, CPU_ATTENTION_CHUNKS + 1) if batch % n == 0)
    if chunks == 1:
        return _attention_core(q, k, v, mask)

    def split(x):  # a [1, 1, T, S] mask is every chunk's
        return jnp.split(x, chunks) if x.shape[0] == batch else [x] * chunks

    masks = [None] * chunks if mask is None else split(mask)
    parts = [_attention_core(*args) for args in zip(split(q), split(k), split(v), masks)]
    return jnp.concatenate(parts)


def _attention_probs(q, k, mask):
    """softmax(q k^T / sqrt(Dh)) in float32, [B, H, T, S]; masked keys (mask False) get probability 0."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _mix(p, v):
    """p [B, H, T, S] (float32) . v [B, S, H, Dh] -> [B, T, H, Dh] in float32, p cast to v's dtype first."""
    return jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


@jax.custom_jvp
def _attention_core(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh), masked) v for q [B, T, H, Dh], k, v [B, S, H, Dh], mask bool [B|1, 1, T, S]
    or None; the result in q's dtype."""
    return _mix(_attention_probs(q, k, mask), v).astype(q.dtype)


@_attention_core.defjvp
def _attention_core_jvp(primals, tangents):
    # With s the logits and p = softmax(s): ds = (dq k^T + q dk^T) / sqrt(Dh) (0 at masked keys), dp = p * (ds -
    # sum(p * ds)), dout = dp v + p dv. JAX transposes this for reverse mode: p is saved (with q, k, v), and
    # the backward is the four products plus one elementwise pass over [B, H, T, S].
    q, k, v, mask = primals
    dq, dk, dv, _ = tangents
    p = _attention_probs(q, k, mask)
    out = _mix(p, v).astype(q.dtype)
    scores = functools.partial(jnp.einsum, "bthd,bshd->bhts", preferred_element_type=jnp.float32)
    # The dk term as (dk q^T)^T through a barrier: transposed for reverse mode, the key gradient then reads a
    # materialised [S, T] transpose of the score cotangent (contracting its minor axis: YNNPACK's form; read
    # in place it contracts the major axis, a single-threaded Eigen dot at half the rate).
    dk_term = jnp.einsum("bshd,bthd->bhst", dk, q, preferred_element_type=jnp.float32)
    ds = (scores(dq, k) + jnp.swapaxes(jax.lax.optimization_barrier(dk_term), -1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        ds = jnp.where(mask, ds, 0.0)
    dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
    return out, (_mix(dp, v) + _mix(p, dv)).astype(q.dtype)


def _pallas_attention(q, k, v, mask, is_causal, interpret):
    """`sparse_attention.block_sparse_attention`, run per shard under the ambient mesh (a Pallas call is not
    partitioned by XLA): the batch and heads split as the activations' logical names say; the length never is."""
    if mask is not None:
        if mask.shape[0] != 1 or mask.shape[1] != 1:
            raise ValueError(f"attention_impl='pallas' takes one mask for the whole batch, got {mask.shape}")
        mask = mask[0, 0]
    kernel = functools.partial(
        sparse_attention.block_sparse_attention, is_causal=is_causal, interpret=interpret
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, mask)
    spec = nn.logical_to_mesh_axes(BLHK)
    if spec[1] is not None:
        raise ValueError("attention_impl='pallas' cannot split the sequence ('length') over devices")
    if mask is None:  # what the kernel assumes too: every key allowed
        mask = jnp.ones((q.shape[1], k.shape[1]), bool)
    # check_vma=False: a pallas_call's outputs carry no varying-axes annotation (each shard is independent).
    replicated = jax.sharding.PartitionSpec()
    per_shard = jax.shard_map(kernel, in_specs=(spec,) * 3 + (replicated,), out_specs=spec, check_vma=False)
    return per_shard(q, k, v, mask)


def cached_attention(q, k, v, cache: LayerCache, masks: DecodeMasks, implementation="xla"):
    """Attention of a query slice over a KV cache and over its own fresh keys/values.

    q, k, v: [B, S, H, Dh] of the slice (rotary applied); cache: [B, C, K, Dh] keys/values (K <= H heads).
    Without a write the slice attends the cache under `attend` and its fresh keys under `self_attend`, one
    softmax over both parts (`attention_over_parts`: the cache is read in place, never concatenated with the
    fresh keys, which would copy it at every layer of every call). With a write the fresh keys/values go into
    the cache first (dynamic_update_slice: in place inside a loop; a scatter of one slice per row when
    write_index is [B]) and the slice attends the updated cache, with self_attend placed at the written
    slots; both are the same sum. Returns (out [B, S, H, Dh], the cache, updated if written).
    """
    del implementation  # the fused kernels want long query tiles; a decode slice is a few tokens: XLA's attention
    length = q.shape[1]
    capacity = cache.keys.shape[1]
    attend = jnp.broadcast_to(masks.attend, (masks.attend.shape[0], length, capacity))
    self_attend = jnp.broadcast_to(masks.self_attend, (attend.shape[0], length, length))
    if masks.write_index is None:
        parts = ((cache.keys, cache.values, attend), (k, v, self_attend))
        return attention_over_parts(q, parts), cache
    w = masks.write_index
    k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
    if jnp.ndim(w) == 0:
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, w, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(attend, self_attend, w, axis=2)
    else:  # one write index per row
        batch = q.shape[0]
        row_write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0))
        write = lambda buf, new: row_write(buf, new, w)
        mask = jax.vmap(lambda a, s, i: jax.lax.dynamic_update_slice_in_dim(a, s, i, axis=1))(
            jnp.broadcast_to(attend, (batch, length, capacity)),
            jnp.broadcast_to(self_attend, (batch, length, length)),
            w,
        )
    cache = LayerCache(
        nn.with_logical_constraint(write(cache.keys, k), BLHK),
        nn.with_logical_constraint(write(cache.values, v), BLHK),
    )
    keys, values = cache.keys.astype(q.dtype), cache.values.astype(q.dtype)
    return attention(q, keys, values, mask[:, None], implementation="xla"), cache


def attention_over_parts(q, parts):
    """softmax(q k^T / sqrt(Dh), masked) v over the union of several key/value sets, without concatenating
    them: the softmax's maximum and sum are taken over every part, then each part's weighted values are added.

    q: [B, T, H, Dh]; parts: ((k [B, S_i, K, Dh], v [B, S_i, K, Dh], mask bool [B|1, T, S_i]), ...), K dividing
    H (grouped-query attention: query head h reads key/value head h // (H / K), as `attention`; the groups are
    an einsum axis, so the keys are not repeated either). Logits and softmax in float32 (float64 for a float64
    q), probabilities cast to the value dtype before the product, as `attention`; a query that may see no key
    at all gets the uniform average over every key of every part (as a fully masked row of `attention`).
    Returns [B, T, H, Dh] in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = parts[0][0].shape[2]
    parts = [part for part in parts if part[0].shape[1]] or parts[:1]  # an empty part (no cache yet) adds nothing
    if heads % kv_heads:
        raise ValueError(f"key/value heads ({kv_heads}) must divide query heads ({heads})")
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = []
    for k, v, mask in parts:
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=acc)
        s = s * (head_dim**-0.5)
        logits.append(jnp.where(mask[:, None, None], s, jnp.finfo(acc).min))
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in logits])
    weights = [jnp.exp(s - top) for s in logits]
    inverse = 1.0 / sum(jnp.sum(e, axis=-1, keepdims=True) for e in weights)
    out = sum(
        jnp.einsum("bkgts,bskd->btkgd", (e * inverse).astype(q.dtype), v.astype(q.dtype), preferred_element_type=acc)
        for e, (_, v, _) in zip(weights, parts)
    )
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions, through `jax.nn.dot_product_attention`.

    implementation: 'xla' (any backend; materialises the [L, L] scores) or 'cudnn' (fused flash attention on
    NVIDIA GPUs, bf16/fp16 only; a boolean mask becomes an additive bias). In jax 0.10.2 implementation=None
    means XLA (jax.nn.dot_product_attention does not auto-select cuDNN), so the choice is explicit. 'pallas':
    the block-sparse flash kernel (NVIDIA GPUs; the BD3-LM 2L mask computes ~1/4 of the dense tiles);
    'pallas_interpret': the same kernel under the Pallas interpreter (any backend, slow: tests).

    Decoding (`cache` given): the slice's queries attend the cache and themselves (see `cached_attention`);
    returns (out, updated cache).

    rotary=False: no rotary (positions are unused: a network with learned absolute positions, GPT-2);
    use_bias: biases on the q/k/v and output projections (GPT-2's c_attn / c_proj).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"
    rotary: bool = True
    use_bias: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        cache: LayerCache | None = None,
        decode_masks: DecodeMasks | None = None,
    ):
        """x: [B, L, d] -> [B, L, d] in `dtype` (and the updated LayerCache when `cache` is given).

        positions: [L] or [B, L] rotary positions; mask: bool [L, L] (True = attend) or None; is_causal:
        lower-triangular. cache, decode_masks: the decode path (mask and is_causal are then unused).
        """
        d_model = x.shape[-1]
        if d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={d_model}")
        head_dim = d_model // self.num_heads
        qkv_kernel = self.param(
            "qkv_kernel",
            nn.with_logical_partitioning(_lecun_normal(0, (1, 2, 3)), ("embed", None, "heads", "kv")),
            (d_model, 3, self.num_heads, head_dim),
            self.param_dtype,
        )
        out_kernel = self.param(
            "out_kernel",
            nn.with_logical_partitioning(_lecun_normal((0, 1), 2), ("heads", "kv", "embed")),
            (self.num_heads, head_dim, d_model),
            self.param_dtype,
        )
        # Three products with slices of the kernel, not one [3, B, L, H, Dh] product split in three: the split's
        # gradient pads each of the three cotangents to the whole [3, ...] shape and adds them (three passes
        # over 3x the activations; ~3% of the peers' tiny step on CPU), the kernel slices' only a [d, 3, H, Dh]
        # weight gradient; the products themselves run as fast.
        x = x.astype(self.dtype)
        q, k, v = (project(x, qkv_kernel[:, i].astype(self.dtype)) for i in range(3))
        if self.use_bias:
            qkv_bias = self.param(
                "qkv_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")),
                (3, self.num_heads, head_dim),
                self.param_dtype,
            ).astype(self.dtype)
            q, k, v = q + qkv_bias[0], k + qkv_bias[1], v + qkv_bias[2]
        if self.rotary:
            q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        q = nn.with_logical_constraint(q, BLHK)
        k = nn.with_logical_constraint(k, BLHK)
        v = nn.with_logical_constraint(v, BLHK)
        if cache is None:
            if mask is not None:
                mask = mask[None, None]  # [1, 1, L, L] broadcasts over batch and heads
            out = attention(q, k, v, mask, is_causal, self.implementation)
        else:
            out, cache = cached_attention(q, k, v, cache, decode_masks, self.implementation)
        out = nn.with_logical_constraint(out, BLHK)  # [B, L, H, Dh]
        out = project(out, out_kernel.astype(self.dtype), n_in=2)
        if self.use_bias:
            out_bias = self.param(
                "out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d_model,),
                self.param_dtype,
            )  # fmt: skip
            out = out + out_bias.astype(self.dtype)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    """Dense(mlp_dim) -> GELU (tanh approximation, as MDLM) -> Dense(d_model), with biases."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, d] -> [B, L, d] in `dtype`."""
        d_model = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            dot_general=dense_dot_general,
            name="fc_in",
        )(x.astype(self.dtype))
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), BLM)
        return nn.Dense(
            d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_lecun_normal(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            dot_general=dense_dot_general,
            name="fc_out",
        )(h)


# ------------------------------------------------------------------------------------------------------------
# Transformer block and output layer.
# ------------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Pre-LayerNorm transformer block, with adaLN-zero time conditioning when `c` is given (MDLM's DDiTBlock).

    With c:    x += gate_a * drop(attn(modulate(LN(x), shift_a, scale_a)))
               x += gate_m * drop(mlp(modulate(LN(x), shift_m, scale_m)))
    where (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = zero-initialised Dense(c): identity at init.
    Without c: x += drop(attn(LN(x))); x += drop(mlp(LN(x))) (time-free networks: RADD, MD4, AR).
    With `cache` (decoding): the attention runs over the cache (SelfAttention) and the block returns
    (x, updated LayerCache). GPT-2's block is this one without time conditioning, with rotary=False (its
    positions are learned, added to the embedding), norm_bias and attention_bias.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    time_conditioning: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    rotary: bool = True
    norm_bias: bool = False
    attention_bias: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c: jax.Array | None,
        positions: jax.Array,
        mask: jax.Array | None,
        is_causal: bool,
        train: bool,
        cache: LayerCache | None = None,
        decode_masks: DecodeMasks | None = None,
    ):
        """x: [B, L, d] float32 residual stream; c: [B, 1 or L, cond_dim] or None -> [B, L, d] float32."""
        d_model = x.shape[-1]
        stream = stream_dtype(self.dtype)
        if self.time_conditioning:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = AdaLNModulation(
                6, d_model, self.param_dtype, stream, name="adaln"
            )(c)
        h = layer_norm("norm_attn", self.param_dtype, stream, self.norm_bias)(x)
        if self.time_conditioning:
            h = modulate(h, shift_a, scale_a)
        attn = SelfAttention(
            self.num_heads, self.dtype, self.param_dtype, self.attention_impl, self.rotary, self.attention_bias,
            name="attn",
        )  # fmt: skip
        if cache is None:
            h = attn(h, positions, mask, is_causal)
        else:
            h, cache = attn(h, positions, cache=cache, decode_masks=decode_masks)
        h = nn.Dropout(self.dropout)(h, deterministic=not train).astype(stream)
        x = x + (gate_a * h if self.time_conditioning else h)
        x = nn.with_logical_constraint(x, BLE)

        h = layer_norm("norm_mlp", self.param_dtype, stream, self.norm_bias)(x)
        if self.time_conditioning:
            h = modulate(h, shift_m, scale_m)
        h = MLP(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train).astype(stream)
        x = x + (gate_m * h if self.time_conditioning else h)
        x = nn.with_logical_constraint(x, BLE)
        return x if cache is None else (x, cache)
