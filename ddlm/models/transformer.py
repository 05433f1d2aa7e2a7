"""One transformer for every objective: bidirectional DiT (MDLM/SEDD/MD4/RADD), causal (AR), block-causal (BD3-LM).

    model = Transformer(vocab_size=..., attention='bidirectional', ...)     # or ddlm.models.get_model(config.model, ...)
    logits = model.apply(variables, tokens, t, x0=None, train=False, rngs={'dropout': key})   # float32 [B, L, V]

The three variants share the code path and differ only in the attention mask:
  'bidirectional'  full attention, optional adaLN-zero time conditioning (MDLM's DDiT).
  'causal'         lower-triangular attention, no time conditioning (the autoregressive baseline).
  'block_causal'   the BD3-LM 2L-input trick: the network sees concat(xt, x0) of length 2L with the mask of
                   `block_diffusion_mask`, rotary positions 0..L-1 for both halves, and returns logits for xt only.

A second family, the LLaMA network (ddlm/models/llama.py: RMSNorm, SwiGLU, grouped-query attention), is a
subclass that swaps the block, the final norm and the output layer through the hooks `_block_class`,
`_block_kwargs`, `_final_norm` and `_output_bias`; masks, rotary, the KV-cache decode path and the logit
shift are this class's.

Logit shift (AR-to-diffusion adaptation, DiffuLLaMA / Fast-dLLM v2): with `logit_shift=True` the output at
position i is the output layer applied at position i - 1 (`logit_shift_sources`), so an adapted AR network
keeps predicting the next token with its own head, and every loss and sampler still reads "logits[:, i]
predict x_i".
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddlm.models import layers, stack

Dtype = Any

ATTENTION_KINDS = ("bidirectional", "causal", "block_causal")
TIME_INPUTS = ("scaled_t", "sigma", "zero")


def logit_shift_sources(length: int, block_size: int | None = None) -> jax.Array:
    """int32 [length]: under the logit shift, the forward position whose output layer predicts position i.

    One-sequence networks (DiffuLLaMA, Gong et al. 2025, Sec. 3.2): i - 1, so position i is predicted where
    the AR network predicted its next token. Position 0 has no left neighbour and keeps its own output (the
    convention of DiffuLLaMA's and Fast-dLLM v2's `cat([logits[:, :1], logits[:, :-1]])`).
    The block-causal 2L input [xt | x0] (block_size given; Fast-dLLM v2, Wu et al. 2025): inside a block, the
    noised position i - 1; at the first position of block b > 0, the clean position i - 1 of the x0 half
    (index length + i - 1), which attends exactly x_0^{<i}: the AR network's own context for token i.
    """
    i = jnp.arange(length)
    sources = jnp.maximum(i - 1, 0)
    if block_size is not None:
        sources = jnp.where((i % block_size == 0) & (i > 0), length + i - 1, sources)
    return sources.astype(jnp.int32)


def check_attention_impl(impl: str, dtype=None, backend: str | None = None) -> None:
    """One-line ValueError for an attention kernel that cannot run here (see `layers.ATTENTION_IMPLS`). With
    dtype None only the name is checked (the decode path, which runs XLA's attention whatever the kernel)."""
    if impl not in layers.ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {layers.ATTENTION_IMPLS}, got {impl!r}")
    if dtype is None:
        return
    backend = backend or jax.default_backend()
    if impl == "cudnn" and (backend != "gpu" or jnp.dtype(dtype) == jnp.float32):
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU and dtype bfloat16, got backend {backend!r} "
            f"and dtype {jnp.dtype(dtype).name}; use attention_impl='xla'"
        )
    if impl == "pallas" and backend != "gpu":
        raise ValueError(
            f"attention_impl='pallas' (the block-sparse Triton kernel) needs an NVIDIA GPU, got backend "
            f"{backend!r}; use attention_impl='xla' ('pallas_interpret' runs the same kernel in the Pallas "
            "interpreter: slow, for tests)"
        )


class Transformer(nn.Module):
    """Token embedding -> num_layers DiT blocks -> (adaLN) LayerNorm -> output projection (fp32 logits).

    Attributes:
      vocab_size: V, size of the input embedding and of the logits (includes the mask id).
      attention: 'bidirectional' | 'causal' | 'block_causal'.
      num_layers, d_model, num_heads, mlp_dim: transformer shape; head_dim = d_model // num_heads.
      cond_dim: width of the time-conditioning vector (used only with time_conditioning).
      dropout: dropout rate after attention and MLP (active only with train=True).
      time_conditioning: adaLN-zero conditioning on t; if False, t is ignored and may be None.
      block_size: tokens per block, for attention='block_causal'.
      dtype: compute dtype of the matmuls; param_dtype: parameter dtype.
      tie_embeddings: output projection = input embedding transposed (no output bias).
      remat: recompute each block in the backward pass (saves activation memory).
      remat_policy: with remat, 'full' (recompute the whole block) or 'dots_saveable' (keep matmul outputs).
      scan_layers: one nn.scan over the blocks (parameters stacked under 'blocks'; compile time flat in
        depth) instead of unrolled blocks 'block_0'...; see ddlm/models/stack.py for converting checkpoints.
      attention_impl: 'xla' (any backend), 'cudnn' (fused attention on NVIDIA GPUs, needs bfloat16 dtype),
        'pallas' (block-sparse flash attention, NVIDIA GPUs: skips the tiles the mask forbids, ~3/4 of BD3-LM's
        2L scores) or 'pallas_interpret' (that kernel in the Pallas interpreter: any backend, slow; tests).
      vocab_multiple: the embedding and output rows are padded to a multiple of this, so that they shard
        evenly over the 'tensor' mesh axis (GPT-2's 50,258 ids do not divide by 4) and tile well; the padded
        rows are never looked up and their logits are sliced off, so the output is [..., vocab_size].
      time_input: what the time embedding reads (with time_conditioning): 'scaled_t' (1000 t, ddlm's own
        networks), 'sigma' (the log-linear noise level -log(1 - (1 - 1e-3) t) that MDLM's, SEDD's and DUO's
        DiTs read) or 'zero' (sigma = 0 whatever t: checkpoints trained with time_conditioning=False, as
        MDLM's and BD3-LM's published ones, whose adaLN still reads the constant embedding of 0).
      max_positions: 0 = rotary positions (every network trained here); > 0 = learned absolute position
        embeddings of this many rows added to the token embedding and no rotary (GPT-2).
      norm_bias: LayerNorms with a bias (GPT-2); attention_bias: biases on the q/k/v and output projections
        (GPT-2).
      self_conditioning: the network also reads `self_cond`, its own previous prediction (probabilities
        [B, L, V]; Chen et al. 2023, "Analog Bits", sec. 3.2), through a linear map added to the token
        embedding: one more parameter, 'self_cond_embedding' [padded V, d], zero-initialised (so a new
        network's second pass starts equal to its first). self_cond=None is the zero signal (the first pass,
        and a sampler's first step). Off: the parameter tree of every network trained without it.
    """

    vocab_size: int
    attention: str = "bidirectional"
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    cond_dim: int = 64
    dropout: float = 0.0
    time_conditioning: bool = True
    block_size: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    tie_embeddings: bool = False
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    attention_impl: str = "xla"
    vocab_multiple: int = 128
    logit_shift: bool = False
    time_input: str = "scaled_t"
    max_positions: int = 0
    norm_bias: bool = False
    attention_bias: bool = False
    self_conditioning: bool = False

    # The output layer has a bias (MDLM's DDitFinalLayer); the LLaMA family has none.
    _output_bias = True

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def cache_layout(self) -> tuple[int, int]:
        """(heads, head_dim) of the KV cache: the key/value heads (fewer than the query heads under GQA)."""
        return self.num_heads, self.d_model // self.num_heads

    # ---- hooks of the network family (overridden by ddlm.models.llama.Llama) -----------------------------

    def _block_class(self):
        """The block module class: called as block(x, c, positions, mask, is_causal, train[, cache, masks])."""
        return layers.DiTBlock

    def _block_kwargs(self) -> dict:
        return {
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout": self.dropout,
            "time_conditioning": self.time_conditioning,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "attention_impl": self.attention_impl,
            "rotary": not self.max_positions,
            "norm_bias": self.norm_bias,
            "attention_bias": self.attention_bias,
        }

    def _final_norm(self, stream_dtype) -> nn.Module:
        return layers.layer_norm("norm_final", self.param_dtype, stream_dtype, self.norm_bias)

    def _check_inputs(self, tokens, t, x0, self_cond=None):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        check_attention_impl(self.attention_impl, self.dtype)
        if self.attention == "causal" and self.time_conditioning:
            raise ValueError(
                "the causal (AR) transformer has no time conditioning: set time_conditioning=False"
            )
        soft = tokens.ndim == 3 and jnp.issubdtype(tokens.dtype, jnp.floating)
        if soft and (tokens.shape[-1] != self.vocab_size or self.attention == "block_causal"):
            raise ValueError(
                f"soft tokens must be float [batch, length, vocab_size={self.vocab_size}] for a network "
                f"without block-causal attention, got {tokens.shape} with attention={self.attention!r}"
            )
        if not soft and (tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer)):
            raise ValueError(
                f"tokens must be int [batch, length] (or float [batch, length, vocab_size]: probabilities), "
                f"got {tokens.dtype} {tokens.shape}"
            )
        batch, length = tokens.shape[:2]
        if self_cond is not None:
            if not self.self_conditioning:
                raise ValueError(
                    "self_cond was given to a network without self-conditioning (model.self_conditioning=False)"
                )
            if tuple(self_cond.shape) != (batch, length, self.vocab_size):
                raise ValueError(
                    f"self_cond must be float [batch, length, vocab_size] = [{batch}, {length}, "
                    f"{self.vocab_size}] (probabilities), got {tuple(self_cond.shape)}"
                )
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")
        if self.max_positions and length > self.max_positions:
            raise ValueError(
                f"the network has {self.max_positions} learned positions (max_positions), got length {length}"
            )
        if self.time_conditioning:
            if t is None:
                raise ValueError(
                    "t is required when time_conditioning=True: float [batch] or [batch, length]"
                )
            t = jnp.asarray(t)
            if t.shape not in ((batch,), (batch, length)):
                raise ValueError(
                    f"t must be float [batch] or [batch, length] = [{batch}] or [{batch}, {length}], got {t.shape}"
                )
        if self.attention == "block_causal":
            if x0 is None:
                raise ValueError(
                    "the block-causal (BD3-LM) transformer needs x0: clean tokens int [batch, length]"
                )
            if x0.shape != tokens.shape or not jnp.issubdtype(x0.dtype, jnp.integer):
                raise ValueError(
                    f"x0 must be int [batch, length] = {tokens.shape}, got {x0.dtype} {x0.shape}"
                )
            if length % self.block_size:
                raise ValueError(f"block_size must divide seq_len={length}, got {self.block_size}")
        elif x0 is not None:
            raise ValueError(
                f"x0 is only used by attention='block_causal', got x0 with attention={self.attention!r}"
            )

    def __call__(
        self,
        tokens: jax.Array,
        t: jax.Array | None = None,
        x0: jax.Array | None = None,
        train: bool = False,
        attention_mask: jax.Array | None = None,
        self_cond: jax.Array | None = None,
    ) -> jax.Array:
        """Logits of the network.

        Args:
          tokens: int [batch, length], the (noised) input sequence xt; or float [batch, length, vocab_size],
            a distribution over the ids at each position, embedded as its mean embedding (DUO's curriculum
            feeds the relaxed softmax(w_t / tau) so, s-sahoo/duo `models/dit.py` EmbeddingLayer).
          t: float [batch] or [batch, length] diffusion time in [0, 1]; ignored (may be None) without time
            conditioning. Block-causal: the clean half x0 is conditioned on t = 0.
          x0: int [batch, length] clean tokens; only for attention='block_causal'.
          train: enables dropout (then pass rngs={'dropout': key}).
          attention_mask: bool [length, length] (True = attend) replacing the full attention of a
            bidirectional network: the causal-to-bidirectional annealing of an adapted AR model
            (`layers.annealed_causal_mask`); None = the network's own pattern.
          self_cond: float [batch, length, vocab_size], the network's previous prediction (softmax of its
            logits) for the xt positions, with self_conditioning only; None = zeros (the first pass).

        Returns:
          float32 [batch, length, vocab_size] logits (for the xt positions); with logit_shift, position i
          holds the output layer at position i - 1 (`logit_shift_sources`).
        """
        self._check_inputs(tokens, t, x0, self_cond)
        batch, length = tokens.shape[:2]
        stream = layers.stream_dtype(self.dtype)

        # ---- inputs, positions, mask -----------------------------------------------------------------------
        mask, is_causal = None, False
        positions = np.arange(length)  # numpy: constant rotary tables (`layers.rotary_embedding`)
        t_tokens = None
        if self.time_conditioning:
            t = jnp.asarray(t, stream)
            t_tokens = t[:, None] if t.ndim == 1 else t  # [B, 1] or [B, L]
        if attention_mask is not None:
            if self.attention != "bidirectional" or tuple(attention_mask.shape) != (length, length):
                raise ValueError(
                    f"attention_mask must be bool [length, length] = [{length}, {length}] for a bidirectional "
                    f"network, got {tuple(attention_mask.shape)} with attention={self.attention!r}"
                )
            mask = attention_mask.astype(bool)
        if self.attention == "causal":
            is_causal = True
        elif self.attention == "block_causal":
            tokens = jnp.concatenate([tokens, x0], axis=1)  # [B, 2L]
            if self_cond is not None:  # the clean half has no previous prediction
                self_cond = jnp.concatenate([self_cond, jnp.zeros_like(self_cond)], axis=1)
            positions = np.concatenate([positions, positions])  # both halves at 0..L-1
            mask = layers.block_diffusion_mask(length, self.block_size)  # [2L, 2L]
            if t_tokens is not None:  # clean tokens x0 sit at t = 0
                t_tokens = jnp.concatenate(
                    [jnp.broadcast_to(t_tokens, (batch, length)), jnp.zeros((batch, length), stream)],
                    axis=1,
                )
        return self._forward(
            tokens,
            positions,
            t_tokens,
            mask,
            is_causal,
            train,
            out_length=length,
            shift=self.logit_shift,
            self_cond=self_cond,
        )

    # ---- decoding with a KV cache ----------------------------------------------------------------------------
    # Design: the cache is explicit arrays in and out (a KVCache pytree), not flax's mutable 'cache'
    # collection (flax lm1b / t5x). The approximate caches for bidirectional networks (Fast-dLLM prefix and
    # dual caches, dKV-Cache) must attend to cached keys at arbitrary slots, skip or keep the write-back, and
    # refresh on their own policy; with explicit arrays every choice is an argument of a pure function, the
    # cache is a lax loop carry updated in place, and it shards by the same logical names as activations.

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: layers.KVCache,
        attend: jax.Array,
        self_attend: jax.Array | None = None,
        t: jax.Array | None = None,
        write_index: jax.Array | int | None = None,
    ):
        """One cached step on a slice of S positions: `model.apply(variables, ..., method='decode')`.

        The slice's queries attend (a) the cache slots where `attend` is True (keys/values as they were before
        this step) and (b) the slice's own fresh keys/values where `self_attend` is True. Masks and writes
        are the caller's choice, so one step serves every attention kind:
          causal (AR):        attend = slots before the slice, self_attend = lower-triangular, write.
          block_causal:       clean blocks are written with t = 0 and self_attend all True (block-causal
                              prefix); a noised block attends the clean slots + itself, no write.
          bidirectional:      any slots (validity mask) + itself; write or not (Fast-dLLM dual / prefix).

        Args:
          tokens: int [batch, S] the slice.
          positions: int [S] or [batch, S] absolute positions (rotary; keys in the cache carry theirs).
          cache: KVCache with keys/values [batch, C, heads, head_dim] per layer (see `init_cache`).
          attend: bool [C], [S, C] or [batch, S, C]: the cache slots each query sees.
          self_attend: bool [S, S] or [batch, S, S]; None = all True (bidirectional within the slice).
          t: float [batch] or [batch, S] time of the slice (time-conditioned networks only; the clean
            blocks of a block-causal network use t = 0, as in the training forward).
          write_index: None, or int [] or [batch] (per row): write the slice's keys/values at slots
            [write_index, write_index + S) (then `attend` on those slots is ignored); must fit in the cache
            (C >= write_index + S).

        Returns:
          (logits float32 [batch, S, vocab_size], the KVCache: updated if written, else the input cache).
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"decode: tokens must be int [batch, S], got {tokens.dtype} {tokens.shape}")
        batch, length = tokens.shape
        check_attention_impl(self.attention_impl)
        if len(cache.keys) != self.num_layers or len(cache.values) != self.num_layers:
            raise ValueError(f"decode: the cache has {len(cache.keys)} layers, the network {self.num_layers}")
        capacity = cache.keys[0].shape[1]
        heads, head_dim = self.cache_layout
        expected = (batch, capacity, heads, head_dim)
        if cache.keys[0].shape != expected:
            raise ValueError(f"decode: cache keys must be [batch, C, heads, head_dim] = {expected}, got "
                             f"{cache.keys[0].shape}")  # fmt: skip
        positions = jnp.asarray(positions)
        if positions.shape not in ((length,), (batch, length)):
            raise ValueError(
                f"decode: positions must be [{length}] or [{batch}, {length}], got {positions.shape}"
            )
        attend = jnp.asarray(attend, bool)
        if attend.ndim == 1:
            attend = attend[None]
        if attend.ndim == 2:
            attend = attend[None]
        if attend.shape[1:] not in ((length, capacity), (1, capacity)) or attend.shape[0] not in (1, batch):
            raise ValueError(f"decode: attend must be bool [C], [S, C] or [batch, S, C] with S={length}, "
                             f"C={capacity}, got {attend.shape}")  # fmt: skip
        if self_attend is None:
            self_attend = jnp.ones((1, length, length), bool)
        self_attend = jnp.asarray(self_attend, bool)
        if self_attend.ndim == 2:
            self_attend = self_attend[None]
        if self_attend.shape[1:] != (length, length) or self_attend.shape[0] not in (1, batch):
            raise ValueError(f"decode: self_attend must be bool [S, S] or [batch, S, S] with S={length}, got "
                             f"{self_attend.shape}")  # fmt: skip
        mask_batch = max(attend.shape[0], self_attend.shape[0])
        attend = jnp.broadcast_to(attend, (mask_batch, length, capacity))
        self_attend = jnp.broadcast_to(self_attend, (mask_batch, length, length))
        if isinstance(write_index, int) and not 0 <= write_index <= capacity - length:
            raise ValueError(
                f"decode: write_index={write_index} + S={length} must fit the cache of {capacity}"
            )
        if write_index is not None:
            write_index = jnp.asarray(write_index, jnp.int32)
            if write_index.shape not in ((), (batch,)):
                raise ValueError(f"decode: write_index must be int [] or [{batch}] (a slot per row), got "
                                 f"{write_index.shape}")  # fmt: skip
        t_tokens = None
        if self.time_conditioning:
            if t is None:
                raise ValueError(
                    "decode: t is required when time_conditioning=True: float [batch] or [batch, S]"
                )
            t = jnp.asarray(t, layers.stream_dtype(self.dtype))
            if t.shape not in ((batch,), (batch, length)):
                raise ValueError(f"decode: t must be float [{batch}] or [{batch}, {length}], got {t.shape}")
            t_tokens = t[:, None] if t.ndim == 1 else t
        masks = layers.DecodeMasks(attend, self_attend, write_index)
        return self._forward(tokens, positions, t_tokens, None, False, False, cache=cache, decode_masks=masks)

    @nn.compact
    def _forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        t_tokens: jax.Array | None,
        mask: jax.Array | None,
        is_causal: bool,
        train: bool,
        out_length: int | None = None,
        cache: layers.KVCache | None = None,
        decode_masks: layers.DecodeMasks | None = None,
        shift: bool = False,
        self_cond: jax.Array | None = None,
    ):
        """Embedding -> blocks -> output layer on prepared inputs; the one place the parameters are created.

        tokens: int [B, L']; positions: [L'] or [B, L']; t_tokens: [B, 1 or L'] or None; out_length: logits for
        the first out_length positions only (the xt half of the block-causal input). shift: the logit shift
        (`logit_shift_sources`). With cache: the decode path, returns (logits, updated KVCache); the decode
        path never shifts (a slice's first prediction comes from a position outside it: the caller's).
        self_cond: float [B, L', V] or None (zeros), with self_conditioning only.
        """
        stream = layers.stream_dtype(self.dtype)
        # ---- embedding and conditioning --------------------------------------------------------------------
        embedding = self.param(
            "token_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.padded_vocab_size, self.d_model),
            self.param_dtype,
        )
        # FSDP-style: gather the table over the 'embed' (fsdp) axis before the lookup; without this XLA cannot
        # partition the gather (batch-sharded ids, embed-sharded table) and replicates the activations.
        table = nn.with_logical_constraint(embedding, ("vocab", None))
        if tokens.ndim == 3:  # probabilities [B, L', V]: the mean embedding (the padded rows get none)
            x = jnp.einsum("blv,vd->bld", tokens.astype(stream), table[: tokens.shape[-1]].astype(stream))
        else:
            x = jnp.take(table, tokens, axis=0).astype(stream)  # [B, L', d]
        if self.max_positions:  # learned absolute positions (GPT-2's wpe), read at each token's position
            position_table = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                (self.max_positions, self.d_model),
                self.param_dtype,
            )
            x = x + jnp.take(position_table, jnp.asarray(positions), axis=0).astype(stream)
        if self.self_conditioning:  # created whether or not a signal is given: init sees self_cond=None
            sc_table = self.param(
                "self_cond_embedding",
                nn.with_logical_partitioning(nn.initializers.zeros, ("vocab", "embed")),
                (self.padded_vocab_size, self.d_model),
                self.param_dtype,
            )
            if self_cond is not None:  # None is the zero signal: adding nothing is adding 0 @ table
                sc_table = nn.with_logical_constraint(sc_table, ("vocab", None))[: self_cond.shape[-1]]
                x = x + jnp.einsum("blv,vd->bld", self_cond.astype(stream), sc_table.astype(stream))
        x = nn.with_logical_constraint(x, layers.BLE)
        c = None
        if self.time_conditioning:
            time_scale = 1000.0
            if self.time_input == "sigma":  # MDLM/SEDD/DUO's log-linear noise level, eps = 1e-3
                t_tokens, time_scale = -jnp.log1p(-(1.0 - 1e-3) * t_tokens), 1.0
            elif self.time_input == "zero":
                t_tokens, time_scale = jnp.zeros_like(t_tokens), 1.0
            c = layers.TimestepEmbedder(
                self.cond_dim, time_scale=time_scale, param_dtype=self.param_dtype, dtype=stream,
                name="time_embedding",
            )(t_tokens)  # fmt: skip

        # ---- blocks ----------------------------------------------------------------------------------------
        if cache is None:
            x = stack.apply_blocks(
                self._block_class(),
                self._block_kwargs(),
                self.num_layers,
                x,
                (c, positions, mask),
                (is_causal, train),
                scan=self.scan_layers,
                remat_policy=self.remat_policy if self.remat else "none",
                # init keeps per-layer tracing: under the lifted jit flax would draw other initial parameters
                # than every earlier run did (dropout masks under it are other draws of the same law, tested)
                trace_once=not self.is_initializing(),
            )
        else:
            x, new_keys, new_values = stack.decode_blocks(
                self._block_class(),
                self._block_kwargs(),
                self.num_layers,
                x,
                (c, positions, None),
                (False, False),
                cache.keys,
                cache.values,
                decode_masks,
                layers.LayerCache,
                scan=self.scan_layers,
            )

        # ---- output layer (MDLM's DDitFinalLayer) ----------------------------------------------------------
        two_halves = out_length is not None and out_length < x.shape[1]
        if shift:  # the hidden states whose outputs predict each position (per token, so c too)
            sources = logit_shift_sources(out_length or x.shape[1], self.block_size if two_halves else None)
            x = jnp.take(x, sources, axis=1)
            if c is not None and c.shape[1] > 1:
                c = jnp.take(c, sources, axis=1)
        elif two_halves:  # block-causal: logits for the xt half only
            x = x[:, :out_length]
            if c is not None:
                c = c[:, :out_length]
        x = self._final_norm(stream)(x)
        if self.time_conditioning:
            shift, scale = layers.AdaLNModulation(
                2, self.d_model, self.param_dtype, stream, name="adaln_final"
            )(c)
            x = layers.modulate(x, shift, scale)
        x = x.astype(self.dtype)
        # The padded rows are cut from the weights, not from the logits, unless the vocabulary is split over
        # devices (then the shards stay even): the logits' cut costs a [batch, length, padded vocab] pad in the
        # backward pass, 4-5% of the peers' tiny step on CPU (benchmarks/step_ab.py); the weights' cut, a pad
        # of the (much smaller) weight gradient.
        rows = self.vocab_size if layers.mesh_split("vocab") == 1 else self.padded_vocab_size
        if self.tie_embeddings:
            logits = layers.project(x, embedding[:rows].T.astype(self.dtype), preferred_element_type=stream)
        else:
            # Zero-initialised as MDLM: uniform predictions at init.
            kernel = self.param(
                "output_kernel",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
                (self.d_model, self.padded_vocab_size),
                self.param_dtype,
            )
            logits = layers.project(x, kernel[:, :rows].astype(self.dtype), preferred_element_type=stream)
            if self._output_bias:
                bias = self.param(
                    "output_bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                    (self.padded_vocab_size,),
                    self.param_dtype,
                )
                logits = logits + bias[:rows].astype(stream)
        logits = nn.with_logical_constraint(logits.astype(stream), layers.BLV)
        if rows != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        if cache is None:
            return logits
        return logits, layers.KVCache(new_keys, new_values)
