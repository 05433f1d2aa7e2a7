"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small autoregressive draft proposes k tokens,
the target verifies them in one call, and standard rejection sampling keeps the output law exactly the target's.

    out = speculative_sample(target, draft, rng, x_init, mask_id=tok.mask_id, k=4)
    # target, draft = models.make_decoder(...) of two causal networks over one vocabulary

x_init int32 [B, L] as for ddlm.sampling.autoregressive.ar_sample: known tokens (a prompt including position 0,
constraints anywhere) and mask_id where generated. The output law is the target's AR sampler's with the same
filters (temperature / top-k / top-p, or greedy): p_i = softmax(filter(target logits)), q_i likewise of the draft.

A round, per row, with tokens x[:n] final (n = the row's next position):
  draft   k calls: q_1 from the draft's output at n - 1, then one token per call; d_i ~ q_i (a known token is
          proposed as itself).
  verify  one target call on [x[n-1], d_1, ..., d_k] at positions n-1 .. n+k-1 (causal, over the target's cache)
          gives p_1 .. p_{k+1}.
  accept  d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (always, at a known position), up to the
          first rejection; a = the accepted count. Position n + a takes a draw from the residual
          norm(max(0, p_{a+1} - q_{a+1})) after a rejection, or from p_{k+1} when all k were accepted (the
          bonus token). n += a + 1: between 1 and k + 1 tokens per target call.
Each token is then distributed as p(. | x_<i): the accepted-or-residual draw has law p exactly (Leviathan et al.,
Appendix A.1), and which positions a round reaches depends only on earlier acceptances (a stopping rule), so the
sequence's law is the target's joint. tests/test_speculative.py checks it by TV against the enumerated joint.

Rows advance by different amounts: each row keeps its own n, and both caches are written at each row's own slots
(`Transformer.decode` with a write index per row). Cache invariants at the start of a round: the target's slots
< n - 1 hold x[:n-1] (the verify call rewrites slots n-1 .. n+k-1, the accepted ones stay valid), the draft's slots
< n - 2 (its first call of a round takes two tokens, x[n-2] and x[n-1], because the draft never wrote d_k when
all k were accepted; at n = 1 both are x[0] at position 0 and the second attends only itself, which is exact).
A finished row is carried along unchanged. Nothing leaves the device: one lax.while_loop over rounds.

nfe counts target calls (prompt prefill chunks + one per round), draft_nfe the draft's; tokens per target call =
generated / nfe, the figure that matters on hardware where a call costs about the same for 1 or k + 1 tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddlm import losses
from ddlm.models.decoding import Decoder, causal_mask
from ddlm.sampling import autoregressive, categorical
from ddlm.sampling.autoregressive import check_decoding_inputs, finish_tokens


class SpeculativeOutput(NamedTuple):
    """SampleOutput's fields (tokens, nfe, trajectory) and the round statistics."""

    tokens: jax.Array  # int32 [B, L]
    nfe: jax.Array  # int32 []: target calls (prefill chunks + rounds)
    trajectory: None
    draft_nfe: jax.Array  # int32 []: draft calls
    rounds: jax.Array  # int32 []: verification rounds
    drafted: jax.Array  # int32 [B]: draft tokens a row had verified (k per round while it was unfinished)
    accepted: jax.Array  # int32 [B]: of them, accepted


def token_probs(logits, *, mask_id, greedy, temperature, top_k, top_p):
    """The sampling law of logits [..., V] as probabilities (float32): softmax of the filtered logits
    (categorical.filter_logits), or one-hot at the argmax when greedy; the mask id has probability 0."""
    logits = logits.astype(jnp.float32).at[..., mask_id].set(losses.NEG_INF)
    if greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(categorical.filter_logits(logits, temperature, top_k, top_p), axis=-1)


def draw(rng, probs, precision: str):
    """One id per row of probs [..., V] (Gumbel-max on log probs; zero-probability ids are never drawn)."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), losses.NEG_INF)
    return categorical.sample_categorical(rng, logp, precision)


def speculative_sample(
    target: Decoder,
    draft: Decoder,
    rng,
    x_init,
    *,
    mask_id: int,
    k: int = 4,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    precision: str = "float64",
    eos_id: int | None = None,
    pad_id: int | None = None,
    stop_at_eos: bool = False,
    prefill_chunk: int = 64,
) -> SpeculativeOutput:
    """Speculative sampling of the target AR network with a draft AR network (module doc).

    Args:
      target, draft: decoders of causal networks with the same vocabulary size.
      rng: key; round r uses fold_in(rng, r).
      x_init: int32 [B, L]; known tokens kept, mask_id generated; position 0 known in every row.
      k: draft tokens per round (>= 1).
      greedy / temperature / top_k / top_p / precision: the sampling law (as ar_sample).
      eos_id, pad_id, stop_at_eos: variable length (ar_sample's `finish_tokens`).
      prefill_chunk: prompt tokens per prefill call (both networks).

    Returns:
      SpeculativeOutput (tokens, nfe = target calls, None, draft_nfe, rounds, drafted [B], accepted [B]).
    """
    check_decoding_inputs(target, "causal", "speculative", x_init, mask_id, stop_at_eos, eos_id)
    if draft.attention != "causal":
        raise ValueError(f"speculative decoding needs a causal draft network, got attention {draft.attention!r}")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.vocab_size}) must be the target's ({target.vocab_size}): the "
            "acceptance test compares their probabilities of the same ids"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (config.sampler.draft_tokens) must be an integer >= 1, got {k!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    autoregressive.check_prompted(x_init, mask_id, "speculative_sample")
    probs = lambda logits: token_probs(
        logits, mask_id=mask_id, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p
    )
    x_init = x_init.astype(jnp.int32)
    batch, length = x_init.shape
    rows = jnp.arange(batch)
    pad = k + 1  # a round reads and writes up to k + 1 positions past a row's n - 1
    x0 = jnp.pad(x_init, ((0, 0), (0, pad)), constant_values=mask_id)
    known = x0 != mask_id
    first_masked = jnp.where(jnp.any(~known[:, :length], axis=1), jnp.argmax(~known[:, :length], axis=1), length)
    start = jnp.maximum(jnp.min(first_masked), 1).astype(jnp.int32)

    # ---- prefill: positions [0, start - 1) of both networks, in chunks (as ar_sample) -------------------------
    chunk = min(prefill_chunk, length)
    capacity = max(-(-length // chunk) * chunk, length + pad)
    slots = jnp.arange(capacity)
    x_prefill = jnp.pad(x0, ((0, 0), (0, capacity - x0.shape[1])), constant_values=mask_id)
    num_chunks = (start - 1 + chunk - 1) // chunk

    def prefill(decoder):
        def body(i, cache):
            s = i * chunk
            tokens = jax.lax.dynamic_slice_in_dim(x_prefill, s, chunk, axis=1)
            return decoder.step(cache, tokens, s + jnp.arange(chunk), slots < s, causal_mask(chunk), None, s)[1]

        return jax.lax.fori_loop(0, num_chunks, body, decoder.init_cache(batch, capacity))

    def at(x, positions):  # x [B, *] at per-row positions [B, m]
        return jnp.take_along_axis(x, positions, axis=1)

    def clip(positions):  # tokens past the end only feed outputs past the end: any valid position will do
        return jnp.minimum(positions, length - 1)

    # ---- one round --------------------------------------------------------------------------------------------
    def round_body(carry):
        r, x, n, tcache, dcache, done, nfe, dnfe, drafted, accepted = carry
        keys = jax.random.split(jax.random.fold_in(rng, r), k + 3)
        offsets = jnp.arange(k)
        draft_pos = n[:, None] + offsets[None, :]  # [B, k]: positions of d_1 .. d_k
        forced = at(known, draft_pos)
        forced_tokens = at(x0, draft_pos)

        # Draft: call 1 on (x[n-2], x[n-1]) writing from slot max(n-2, 0), then k - 1 single-token calls.
        first = jnp.maximum(n - 2, 0)
        pos2 = jnp.stack([first, n - 1], axis=1)
        self2 = jnp.where(
            (n >= 2)[:, None, None], causal_mask(2)[None], jnp.eye(2, dtype=bool)[None]
        )  # at n = 1 both tokens are x[0] at position 0: the second attends only itself
        logits, dcache = draft.step(
            dcache, at(x, pos2), clip(pos2), (slots[None, :] < first[:, None])[:, None], self2, None, first
        )
        q_list, d_list = [probs(logits[:, 1])], []

        def propose(i, q):  # d_{i+1} from q_{i+1}, or the known token there
            d = draw(keys[i], q, precision)
            return jnp.where(forced[:, i], forced_tokens[:, i], d)

        d_list.append(propose(0, q_list[0]))
        for i in range(1, k):
            p_in = n + i - 1  # the position of d_i
            logits, dcache = draft.step(
                dcache,
                d_list[-1][:, None],
                clip(p_in)[:, None],
                (slots[None, :] < p_in[:, None])[:, None],
                jnp.ones((1, 1), bool),
                None,
                p_in,
            )
            q_list.append(probs(logits[:, 0]))
            d_list.append(propose(i, q_list[-1]))
        q = jnp.stack(q_list, axis=1)  # [B, k, V]
        d = jnp.stack(d_list, axis=1)  # [B, k]

        # Verify: the target on [x[n-1], d_1..d_k] at positions n-1 .. n+k-1, written from slot n - 1.
        v_tokens = jnp.concatenate([at(x, (n - 1)[:, None]), d], axis=1)
        v_pos = (n - 1)[:, None] + jnp.arange(k + 1)[None, :]
        logits, tcache = target.step(
            tcache, v_tokens, clip(v_pos), (slots[None, :] < (n - 1)[:, None])[:, None], causal_mask(k + 1),
            None, n - 1,
        )  # fmt: skip
        p = probs(logits)  # [B, k + 1, V]

        # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); a = accepted before the first rejection.
        p_d = jnp.take_along_axis(p[:, :k], d[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, d[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(keys[k], (batch, k))
        ok = forced | (u * q_d < p_d)  # u < p/q without dividing by a zero q (q_d > 0 where d was drawn)
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [B]

        # Position n + a: the residual after a rejection, p_{k+1} after k acceptances (the bonus token).
        p_next = p[rows, a]  # [B, V]
        q_next = jnp.where((a < k)[:, None], q[rows, jnp.minimum(a, k - 1)], 0.0)
        residual = jnp.maximum(p_next - q_next, 0.0)
        # p == q up to rounding can leave no mass (a rejection that exact arithmetic would not make): use p.
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_next)
        c = draw(keys[k + 1], residual, precision)
        c_pos = n + a
        c = jnp.where(at(known, c_pos[:, None])[:, 0], at(x0, c_pos[:, None])[:, 0], c)

        # Write d_1..d_a and c at positions n .. n + a of each unfinished row.
        span = n[:, None] + jnp.arange(k + 1)[None, :]  # [B, k + 1]
        new = jnp.where(jnp.arange(k + 1)[None, :] < a[:, None], jnp.pad(d, ((0, 0), (0, 1))), c[:, None])
        keep = (jnp.arange(k + 1)[None, :] <= a[:, None]) & ~done[:, None]
        x = x.at[rows[:, None], span].set(jnp.where(keep, new, at(x, span)))
        n_new = jnp.where(done, n, jnp.minimum(n + a + 1, length))
        if stop_at_eos:
            generated = keep & ~at(known, span) & (span < length) & (new == eos_id)
            done = done | jnp.any(generated, axis=1)
        done = done | (n_new >= length)
        live = ~carry[5]  # rows unfinished at the start of this round
        drafted = drafted + jnp.where(live, k, 0)
        accepted = accepted + jnp.where(live, a, 0)
        return r + 1, x, n_new, tcache, dcache, done, nfe + 1, dnfe + k, drafted, accepted

    def cond(carry):
        return ~jnp.all(carry[5])

    n0 = jnp.full((batch,), start, jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (
        jnp.zeros((), jnp.int32),
        x0,
        n0,
        prefill(target),
        prefill(draft),
        n0 >= length,
        num_chunks.astype(jnp.int32),
        num_chunks.astype(jnp.int32),
        zeros,
        zeros,
    )
    r, x, _, _, _, _, nfe, dnfe, drafted, accepted = jax.lax.while_loop(cond, round_body, carry)
    # Known tokens past the generated region (a row that stopped at eos) are restored as ar_sample keeps them.
    x = jnp.where(known[:, :length], x_init, x[:, :length])
    tokens = finish_tokens(x, x_init, mask_id, eos_id if stop_at_eos else None, pad_id)
    return SpeculativeOutput(tokens, nfe, None, dnfe, r, drafted, accepted)
