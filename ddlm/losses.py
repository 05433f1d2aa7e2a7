"""Loss functions of discrete diffusion language models, as pure jittable functions.

Every per-token loss takes the network output for a batch and returns [batch, length] in float32 (or
float64 when given float64 inputs; bf16 network outputs are upcast, never used for the loss); the
NELBO estimate per token is `masked_mean(per_token, loss_mask)`. Inputs:

    logits / log_score: [batch, length, vocab]  (any float dtype; the loss is computed in >= float32)
    x0, xt:             int [batch, length]     clean and corrupted tokens
    t:                  [batch] or [batch, length] diffusion time in (0, 1)

`training_loss` is the glue the trainer calls: it samples times and corruptions, calls the network
and averages the right per-token loss. Reference implementations these formulas were checked
against are cited at each function (kuleshov-group/mdlm, louaaron/Score-Entropy-Discrete-Diffusion,
ML-GSAI/RADD, kuleshov-group/bd3lms, google-deepmind/md4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from ddlm import processes
from ddlm import schedules as schedules_lib

# A large finite negative logit for impossible tokens: -inf would turn 0 * -inf into NaN
# (MDLM's `neg_infinity = -1000000.0`).
NEG_INF = -1e6


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------


def _check_tokens(name: str, x, like_shape=None):
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int [batch, length], got {x.dtype} {tuple(x.shape)}")
    if like_shape is not None and tuple(x.shape) != tuple(like_shape):
        raise ValueError(f"{name} must have shape {tuple(like_shape)} [batch, length], got {tuple(x.shape)}")


def _check_logits(name: str, logits, x0):
    _check_tokens("x0", x0)
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(x0.shape):
        raise ValueError(
            f"{name} must be [batch, length, vocab] with [batch, length] = {tuple(x0.shape)}, "
            f"got {tuple(logits.shape)}"
        )


def _at_least_f32(x):
    """Upcast bf16/f16 to float32; keep float32/float64 as they are."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_token_time(t, x0, name="t"):
    """t: [B] or [B, L] -> float32 [B, L]."""
    t = _at_least_f32(t)
    b, n = x0.shape
    if t.shape == (b,):
        return jnp.broadcast_to(t[:, None], (b, n))
    if t.shape == (b, n):
        return t
    raise ValueError(f"{name} must be [batch] = ({b},) or [batch, length] = ({b}, {n}), got {tuple(t.shape)}")


def check_token_ids(tokens, vocab_size: int, name: str = "tokens", mask_id: int | None = None):
    """Opt-in runtime check (inside `checkify.checkify`) that ids are in [0, vocab_size) and not mask_id."""
    checkify.check(
        jnp.all((tokens >= 0) & (tokens < vocab_size)),
        f"{name}: token ids must be in [0, {vocab_size})",
    )
    if mask_id is not None:
        checkify.check(jnp.all(tokens != mask_id), f"{name}: clean data contains the mask id {mask_id}")


def masked_mean(per_token, mask=None):
    """Mean of per_token [B, L] over positions where mask [B, L] is nonzero (all if mask is None)."""
    per_token = _at_least_f32(per_token)
    if mask is None:
        return jnp.mean(per_token)
    mask = mask.astype(per_token.dtype)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask must have shape {tuple(per_token.shape)}, got {tuple(mask.shape)}")
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _gather(values, ids):
    """values [B, L, V], ids [B, L] -> values[b, l, ids[b, l]] as [B, L].

    A one-hot select and sum rather than take_along_axis: exactly the same value (the other terms are exact
    zeros), but its gradient is an elementwise select that fuses into the softmax's backward pass, where
    take_along_axis's gradient is a scatter into a fresh [B, L, V] buffer."""
    hit = jnp.arange(values.shape[-1]) == ids[..., None]
    return jnp.sum(jnp.where(hit, values, jnp.zeros((), values.dtype)), axis=-1)


# --------------------------------------------------------------------------------------------
# Time sampling
# --------------------------------------------------------------------------------------------


def sample_times(rng, batch_size: int, antithetic: bool = True, dtype=jnp.float32):
    """t [batch_size] in [0, 1): i.i.d. uniform, or low-discrepancy (VDM's and MD4's variance reduction):
    t_i = (u + i / B) mod 1 with one shared u ~ U[0, 1): each t_i is still U[0, 1), so estimators stay
    unbiased, while the batch covers [0, 1) evenly."""
    if not antithetic:
        return jax.random.uniform(rng, (batch_size,), dtype=dtype)
    u = jax.random.uniform(rng, (), dtype=dtype)
    return jnp.mod(u + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)


def discretize_times(t, num_steps: int):
    """Maps t in [0, 1) to the grid {1/T, ..., 1}: k = floor(t T) + 1, uniform over k if t is uniform."""
    return (jnp.floor(t * num_steps) + 1.0) / num_steps


# --------------------------------------------------------------------------------------------
# Masked diffusion (MDLM / MD4) and its discrete-time form (D3PM absorbing)
# --------------------------------------------------------------------------------------------


def subs_log_probs(logits, xt, mask_id: int):
    """MDLM's SUBS parameterisation (MDLM, 'SUBS'): zero probability on the mask ("zero masking
    probabilities") and unmasked tokens copied through ("carry-over unmasking").

    logits: [B, L, V]; xt: int [B, L]. Returns float32 log-probs [B, L, V] of x_0.
    """
    logits = _at_least_f32(logits)
    logits = logits.at[..., mask_id].set(NEG_INF)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    carry = jnp.where(jax.nn.one_hot(xt, logits.shape[-1], dtype=bool), 0.0, NEG_INF)
    return jnp.where((xt == mask_id)[..., None], log_probs, carry)


def _masked_weight(is_masked, weight):
    """The weight where a token is masked, else exactly 0: keeps an infinite weight at t = 0 (where no
    token is masked) out of both the loss and its gradient (0 * inf would be NaN)."""
    return jnp.where(is_masked, weight, 0.0)


def _masked_nll(logits, x0, xt, mask_id):
    """-log p_theta(x_0 | x_t) at masked positions, 0 elsewhere: float32 [B, L].

    At a masked position SUBS's log-probabilities (`subs_log_probs`) are the log-softmax over the ids other
    than the mask, so -log p(x_0) = logsumexp_{v != mask}(logits_v) - logits_{x_0} (x_0 is never the mask).
    Written so, the loss reads the [B, L, V] logits in a few reductions and its gradient is one fused
    elementwise pass (softmax - one-hot); the log-probability tensor, the carry-over one-hot and a scatter
    are never built."""
    _check_logits("logits", logits, x0)
    _check_tokens("xt", xt, x0.shape)
    logits = _at_least_f32(logits)
    not_mask = jnp.arange(logits.shape[-1]) != mask_id
    log_norm = jax.nn.logsumexp(jnp.where(not_mask, logits, NEG_INF), axis=-1)
    return jnp.where(xt == mask_id, log_norm - _gather(logits, x0), 0.0)


def mdlm_loss(logits, x0, xt, t, schedule: schedules_lib.Schedule, mask_id: int):
    """Continuous-time masked diffusion NELBO per token (MDLM eq. 10; MD4's continuous-time ELBO):

        L = E_{t ~ U[0,1]} E_{x_t} [ -alpha'(t) / (1 - alpha(t)) * sum_{l: x_t^l = mask} -log p_theta(x_0^l | x_t) ]

    For the log-linear schedule the weight is 1/t (MDLM's `dsigma / expm1(sigma)`). Unbiased for the
    NELBO when t ~ U[0, 1] and x_t ~ q(x_t | x_0). Returns float32 [B, L].
    """
    nll = _masked_nll(logits, x0, xt, mask_id)
    t = _per_token_time(t, x0)
    return _masked_weight(xt == mask_id, schedule.mdlm_weight(t)) * nll


def d3pm_absorbing_loss(logits, x0, xt, t, schedule: schedules_lib.Schedule, mask_id: int, num_steps: int):
    """Discrete-time masked diffusion NELBO with T = num_steps steps (D3PM absorbing; MDLM's and MD4's discrete-time ELBO):

        L_T = sum_{k=1..T} E_{x_{t(k)}} [ (alpha(s) - alpha(t)) / (1 - alpha(t)) sum_{masked l} -log p_theta(x_0^l | x_t) ],
        t = k/T, s = (k-1)/T,

    the KL between the exact posterior and the SUBS reverse step. Estimated with k ~ U{1..T} as
    T * (term at k): pass t on the grid (`discretize_times`). Assumes alpha(0) = 1 (no reconstruction
    term). L_T >= the continuous bound and decreases towards it as T doubles. Returns float32 [B, L].
    """
    nll = _masked_nll(logits, x0, xt, mask_id)
    t = _per_token_time(t, x0)
    s = t - 1.0 / num_steps
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    return _masked_weight(xt == mask_id, num_steps * (a_s - a_t) / (1.0 - a_t)) * nll


# --------------------------------------------------------------------------------------------
# SEDD score entropy and RADD
# --------------------------------------------------------------------------------------------


def _expm1_sigma(schedule, t):
    """e^sigma - 1 computed stably (SEDD's `esigm1`): equals (1 - alpha) / alpha."""
    return jnp.expm1(schedule.sigma(t))


def sedd_absorbing_log_cond(logits):
    """The time-free part of SEDD's absorbing parameterisation: log c = logits - log(V - 1), with the log
    ratios log p_t(x_t^{l<-y}) / p_t(x_t) = log(alpha/(1-alpha)) + log c_y at a masked position
    (`sedd_absorbing_log_score`; the samplers take this form, finite at t = 0 and at alpha = 0).
    For the exact score c must be p(x_0 = y | x_t), i.e. the network must output
    log p(x_0 = y | x_t) + log(V - 1). logits: [B, L, V] (V counts the mask id); float32 out."""
    return _at_least_f32(logits) - math.log(logits.shape[-1] - 1)


def sedd_absorbing_log_score(logits, t, schedule: schedules_lib.Schedule):
    """SEDD's absorbing parameterisation (SEDD `model/transformer.py`, scale_by_sigma): the network output
    is shifted by -log(e^sigma - 1) - log(V - 1), so that

        log s_y = logits_y - log(e^sigma - 1) - log(V - 1),  and the exact score is
        log s_y = log(alpha/(1-alpha)) + log p(x_0 = y | x_t)   (RADD Thm. 1).

    The exact score is therefore reached only when the network outputs log p(x_0 = y | x_t) + log(V - 1):
    plain log-probabilities (a normalised softmax) are off by log(V - 1) in every column and give a wrong
    NELBO. Training finds the shift by itself; an oracle or a converted denoiser must add it.
    logits [B, L, V] (V counts the mask id); t [B] or [B, L]. Returns float32 [B, L, V]."""
    t = _per_token_time(t, jnp.zeros(logits.shape[:2], jnp.int32))
    return sedd_absorbing_log_cond(logits) - jnp.log(_expm1_sigma(schedule, t))[..., None]


def score_entropy_absorbing_loss(log_score, x0, xt, t, schedule: schedules_lib.Schedule, mask_id: int):
    """Denoising score entropy on the absorbing graph (SEDD's L_DSE with Q^absorb; SEDD `graph_lib.Absorbing`):

        L = E_t E_{x_t} [ sigma'(t) sum_{l: x_t^l = mask} ( sum_{y != mask} s_y - r log s_{x_0^l} + K(r) ) ]

    with s = exp(log_score) the estimated ratios p_t(x_t^{l<-y}) / p_t(x_t), r = alpha/(1-alpha) = 1/(e^sigma - 1)
    the true conditional ratio, and K(r) = r (log r - 1) making each term >= 0 (0 iff s_{x_0} = r, other s = 0).
    The forward rate from a token to the mask is sigma'(t). Returns float32 [B, L].
    """
    _check_logits("log_score", log_score, x0)
    _check_tokens("xt", xt, x0.shape)
    is_masked = xt == mask_id
    # Scores at unmasked positions are unused: zero them so exp() cannot overflow into the gradient.
    log_score = jnp.where(is_masked[..., None], _at_least_f32(log_score), 0.0)
    t = _per_token_time(t, x0)
    esigm1 = jnp.where(is_masked, _expm1_sigma(schedule, t), 1.0)
    ratio = 1.0 / esigm1
    log_ratio = -jnp.log(esigm1)
    not_mask = jnp.arange(log_score.shape[-1]) != mask_id
    pos = jnp.sum(jnp.where(not_mask, jnp.exp(log_score), 0.0), axis=-1)
    neg = ratio * _gather(log_score, x0)
    const = ratio * (log_ratio - 1.0)
    entropy = jnp.where(is_masked, pos - neg + const, 0.0)
    return _masked_weight(is_masked, schedule.dsigma(t)) * entropy


def score_entropy_uniform_loss(log_score, x0, xt, t, schedule: schedules_lib.Schedule):
    """Denoising score entropy on the uniform graph (SEDD's L_DSE with Q^uniform = 1/V 11^T - I; SEDD `graph_lib.Uniform`):

        L = E_t E_{x_t} [ sigma'(t)/V sum_l sum_{y != x_t^l} ( s_y - r_y log s_y + K(r_y) ) ]

    with r_y = q_t(y | x_0^l) / q_t(x_t^l | x_0^l): if x_t^l = x_0^l every r_y = (e^sigma - 1)/(e^sigma - 1 + V);
    otherwise r_{x_0} = 1 + V/(e^sigma - 1) and r_y = 1 for the other y. Logs via log1p for stability.
    log_score: [B, L, V] estimated log p_t(x_t^{l<-y}) / p_t(x_t). Returns float32 [B, L].
    """
    _check_logits("log_score", log_score, x0)
    _check_tokens("xt", xt, x0.shape)
    log_score = _at_least_f32(log_score)
    n = log_score.shape[-1]
    t = _per_token_time(t, x0)[..., None]
    # Floor at a tiny positive value: at t = 0 of a schedule with sigma(0) = 0, V / esigm1 stays finite.
    esigm1 = jnp.maximum(_expm1_sigma(schedule, t), 1e-30)
    v = jnp.arange(n)
    same = (xt == x0)[..., None]
    is_x0 = v == x0[..., None]
    log1p_n = jnp.log1p(n / esigm1)
    ratio = jnp.where(same, esigm1 / (esigm1 + n), jnp.where(is_x0, 1.0 + n / esigm1, 1.0))
    log_ratio = jnp.where(same, -log1p_n, jnp.where(is_x0, log1p_n, 0.0))
    terms = jnp.exp(log_score) - ratio * log_score + ratio * (log_ratio - 1.0)
    terms = jnp.where(v == xt[..., None], 0.0, terms)
    return schedule.dsigma(t[..., 0]) / n * jnp.sum(terms, axis=-1)


def radd_loss(logits, x0, xt, mask_rate, mask_id: int):
    """RADD's time-agnostic lambda-DCE loss (RADD, 'lambda-DCE'): with each token masked independently
    with probability lambda ~ U[0, 1] and a network without time input,

        L = E_lambda E_{x^lambda} [ 1/lambda sum_{masked l} -log p_theta(x_0^l | x^lambda) ].

    It equals the SEDD absorbing loss under the score reparameterisation s = alpha/(1-alpha) p_theta(x_0 | x_t)
    (RADD's reparameterisation theorem), and the MDLM loss with alpha = 1 - lambda. mask_rate: lambda [B] or [B, L]. Returns [B, L].
    """
    nll = _masked_nll(logits, x0, xt, mask_id)
    lam = _per_token_time(mask_rate, x0, "mask_rate")
    return _masked_weight(xt == mask_id, 1.0 / lam) * nll


def radd_any_order_loss(logits, x0, xt, mask_id: int):
    """RADD's any-order (AO-ARM) form (RADD, 'AO-ARM' equivalence): with k ~ U{1..L} and k positions masked uniformly,

        L = E_k E_{x^(k)} [ L/k sum_{masked l} -log p_theta(x_0^l | x^(k)) ].

    k is read off x_t (number of masked positions per sequence). Returns float32 [B, L]."""
    nll = _masked_nll(logits, x0, xt, mask_id)
    n = x0.shape[1]
    k = jnp.sum(xt == mask_id, axis=1, keepdims=True).astype(nll.dtype)
    return nll * n / jnp.maximum(k, 1.0)


def sample_any_order_mask(rng, batch_size: int, length: int):
    """For `radd_any_order_loss`: bool [B, L] masks with k ~ U{1..L} positions masked, chosen uniformly."""
    k_rng, perm_rng = jax.random.split(rng)
    k = jax.random.randint(k_rng, (batch_size, 1), 1, length + 1)
    ranks = jnp.argsort(jax.random.uniform(perm_rng, (batch_size, length)), axis=1)
    ranks = jnp.argsort(ranks, axis=1)
    return ranks < k


# --------------------------------------------------------------------------------------------
# Block diffusion (BD3-LM) and the autoregressive baseline
# --------------------------------------------------------------------------------------------


def block_times_to_tokens(t_blocks, block_size: int, length: int):
    """t_blocks [B, L / block_size] -> per-token times [B, L]."""
    if length % block_size:
        raise ValueError(f"block_size must divide seq_len={length}, got {block_size}")
    if t_blocks.ndim != 2 or t_blocks.shape[1] * block_size != length:
        raise ValueError(
            f"t_blocks must be [batch, num_blocks = {length // block_size}], got {tuple(t_blocks.shape)}"
        )
    return jnp.repeat(t_blocks, block_size, axis=1)


def block_diffusion_loss(
    logits, x0, xt, t_blocks, schedule: schedules_lib.Schedule, mask_id: int, block_size: int
):
    """Block diffusion NELBO (BD3-LM's block NELBO; kuleshov-group/bd3lms `diffusion.py`): the sequence is cut into blocks of
    block_size tokens; block b is noised with its own t_b and denoised given the clean blocks < b:

        L = sum_b E_{t_b} E_{x_t^b} [ -alpha'(t_b)/(1 - alpha(t_b)) sum_{masked l in b} -log p_theta(x_0^l | x_t^b, x_0^{<b}) ].

    The conditioning on clean earlier blocks is the network's job (block-causal attention); `logits`
    are its predictions for the noised half. With block_size = length it is `mdlm_loss`. With block_size = 1
    (and alpha(0) = 1, alpha(1) = 0) each token is predicted from the clean tokens before it, so the NELBO
    is the autoregressive NLL of all L tokens; `autoregressive_loss` scores only tokens 1..L-1 (the first
    has no prediction), so the two are equal only when the AR sequence starts with a BOS token that the
    block model does not see (AR on [bos, x_0..x_{L-1}] vs. block diffusion on x_0..x_{L-1}).
    t_blocks: [B, L / block_size].
    """
    _check_logits("logits", logits, x0)
    t = block_times_to_tokens(t_blocks, block_size, x0.shape[1])
    return mdlm_loss(logits, x0, xt, t, schedule, mask_id)


def autoregressive_loss(logits, tokens, mask_id: int | None = None):
    """Next-token cross-entropy: logits[:, i] predicts tokens[:, i + 1]. Returns float32 [B, L - 1].

    mask_id: a column the softmax leaves out, as ddlm's AR sampler does (`ddlm.sampling.autoregressive`: the
    mask id is never drawn), so that exp(-loss) is the sampler's probability. Every network of ddlm has the
    mask id among its outputs; a network imported without one (LLaMA, Qwen2: an appended row with a zero
    output column) would otherwise put exp(0) into every normaliser."""
    _check_logits("logits", logits, tokens)
    logits = _at_least_f32(logits[:, :-1])
    if mask_id is not None:
        logits = logits.at[..., mask_id].set(NEG_INF)
    return jax.nn.logsumexp(logits, axis=-1) - _gather(logits, tokens[:, 1:])


# --------------------------------------------------------------------------------------------
# Boundary terms of the NELBO: prior (t = 1) and reconstruction (t = 0)
# --------------------------------------------------------------------------------------------
# The per-token losses above are the diffusion term over t in [0, 1]. The full bound is
#     -log p(x_0) <= E[-log p(x_0 | x_{t=0})] + diffusion term + KL(q(x_{t=1} | x_0) || p(x_{t=1})),
# and the two boundary terms vanish only when alpha(0) = 1 and alpha(1) = 0. Each function below returns
# nats per token (the same for every token), to add to the diffusion term's per-token estimate. They are
# closed forms with fixed decoders / priors, so no network call is needed: a valid (conservative) bound.


def _alpha_and_complement(schedule: schedules_lib.Schedule, t: float):
    """(alpha(t), 1 - alpha(t)) as arrays, the complement as -expm1(-sigma) so that 1 - alpha(0) = 1e-4 keeps
    its digits in float32."""
    t = jnp.asarray(t)
    return schedule.alpha(t), -jnp.expm1(-schedule.sigma(t))


def absorbing_prior_kl(schedule: schedules_lib.Schedule, num_data_ids: int):
    """Prior term of masked diffusion when alpha(1) > 0 (e.g. the log-linear schedule's alpha(1) = eps).

    With the prior p(x_1) = mask w.p. 1 - alpha(1), else a uniform data id (which the SUBS reverse process
    carries over), KL(q(x_1 | x_0) || p(x_1)) = alpha(1) log(num_data_ids) per token; 0 when alpha(1) = 0.
    MDLM and MD4 drop this term (md4's `latent_loss` returns 0). num_data_ids: ids data can hold (vocab - 1)."""
    a1, _ = _alpha_and_complement(schedule, 1.0)
    return a1 * math.log(num_data_ids)


def absorbing_reconstruction_nll(schedule: schedules_lib.Schedule, num_data_ids: int):
    """Reconstruction term of masked diffusion when alpha(0) < 1 (md4's eps-rescaled schedules): a token still
    masked at t = 0 (probability 1 - alpha(0)) is decoded uniformly, costing log(num_data_ids) nats
    (md4 `MD4.recon_loss`). 0 when alpha(0) = 1."""
    _, one_minus_a0 = _alpha_and_complement(schedule, 0.0)
    return one_minus_a0 * math.log(num_data_ids)


def uniform_prior_kl(schedule: schedules_lib.Schedule, vocab_size: int):
    """Prior term of the uniform graph (SEDD's KL(p_{T|0}(. | x_0) || p_base)): KL(q(x_1 | x_0) || uniform)
    per token, with q(x_1 = x_0) = a + (1 - a)/V and q(x_1 = y) = (1 - a)/V otherwise, a = alpha(1):

        KL = q_same log(V q_same) + (V - 1) q_other log(V q_other),  V q_same = 1 + a (V - 1), V q_other = 1 - a.
    """
    a1, one_minus_a1 = _alpha_and_complement(schedule, 1.0)
    n = vocab_size
    q_same = a1 + one_minus_a1 / n
    q_other = one_minus_a1 / n
    return q_same * jnp.log1p(a1 * (n - 1)) + (n - 1) * q_other * jnp.log1p(-a1)


def uniform_reconstruction_nll(schedule: schedules_lib.Schedule, vocab_size: int):
    """Reconstruction term of the uniform graph, E[-log p(x_0 | x_{t=0})], with the decoder
    p(x_0 = y | x_{t=0}) = q(x_{t=0} | x_0 = y) (the kernel is symmetric, so it is normalised over y): the
    entropy of one row of the kernel at a = alpha(0),

        -[q_same log q_same + (V - 1) q_other log q_other],  q_same = a + (1 - a)/V, q_other = (1 - a)/V.

    For SEDD's geometric schedule (sigma(0) = 1e-4) and V = 50k this is ~2.1e-3 nats per token."""
    a0, one_minus_a0 = _alpha_and_complement(schedule, 0.0)
    n = vocab_size
    q_same = a0 + one_minus_a0 / n
    q_other = one_minus_a0 / n
    # 0.0 - (...) rather than -(...): an exact 0 stays +0.0 in reports.
    return 0.0 - (
        jax.scipy.special.xlogy(q_same, q_same) + (n - 1) * jax.scipy.special.xlogy(q_other, q_other)
    )


def boundary_terms(name: str, schedule: schedules_lib.Schedule | None, vocab_size: int):
    """(prior, reconstruction) nats per token that the loss `name` leaves out of the NELBO. The absorbing
    losses' data ids exclude the mask (vocab_size - 1); RADD's masking rate runs exactly from 0 to 1 and the
    autoregressive loss is exact, so theirs are 0."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    if name in ("ar", "radd"):
        return 0.0, 0.0
    if name in ("sedd_uniform", "duo"):  # DUO's `_prior_loss` is uniform_prior_kl
        return uniform_prior_kl(schedule, vocab_size), uniform_reconstruction_nll(schedule, vocab_size)
    return absorbing_prior_kl(schedule, vocab_size - 1), absorbing_reconstruction_nll(
        schedule, vocab_size - 1
    )


# --------------------------------------------------------------------------------------------
# Evaluation: the masked NELBO with the number of masked tokens importance-sampled
# --------------------------------------------------------------------------------------------

COUNT_SAMPLED_LOSSES = ("mdlm", "sedd_absorb", "radd", "bd3lm")


def sample_masks_by_count(rng, num_rows: int, length: int, block_size: int):
    """For `count_sampled_nelbo`: in each block of block_size positions of each row, k ~ U{1..block_size}
    positions are masked, chosen uniformly, and a mask rate lam ~ Beta(k, block_size - k + 1) is drawn.

    k is stratified over the rows (k = floor(((u + r / R) mod 1) n) + 1 with one u per block), so R copies
    of one sequence cover the counts evenly. Returns (mask bool [R, L], lam [R, L / block_size],
    k [R, L / block_size])."""
    if length % block_size:
        raise ValueError(f"block_size must divide seq_len={length}, got {block_size}")
    nb = length // block_size
    u_rng, perm_rng, beta_rng = jax.random.split(rng, 3)
    u = jnp.mod(jax.random.uniform(u_rng, (1, nb)) + jnp.arange(num_rows)[:, None] / num_rows, 1.0)
    k = jnp.minimum(jnp.floor(u * block_size) + 1.0, block_size)  # [R, nb]
    keys = jax.random.uniform(perm_rng, (num_rows, nb, block_size))
    ranks = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)  # a uniform random permutation per block
    mask = (ranks < k[..., None]).reshape(num_rows, length)
    lam = jax.random.beta(beta_rng, k, block_size - k + 1.0)
    return mask, lam, k


def count_sampled_nelbo(
    name: str,
    apply_fn: ApplyFn,
    x0,
    loss_mask,
    rng,
    *,
    schedule: schedules_lib.Schedule | None,
    mask_id: int,
    block_size: int | None = None,
):
    """One estimate per row of the masked-diffusion NELBO (the diffusion term, in nats), sampling the number
    of masked tokens instead of the time: bounded importance weights.

    With lam = 1 - alpha(t) the continuous-time NELBO of a block of n positions is

        int dlam (dt/dlam) sum_M lam^|M| (1 - lam)^(n - |M|) F(M, t(lam)),

    F the sum of the per-token losses (weights included) over the masked set M. Drawing k ~ U{1..n}, M
    uniform of size k and lam ~ Beta(k, n - k + 1) (`sample_masks_by_count`) makes the importance weight
    (n / k) lam dt/dlam = (n / k) / w(t), w = -alpha'/(1 - alpha) the MDLM weight, so

        Y = sum_blocks (n / k) sum_{l in M} loss_l / w(t_l),

    for 'mdlm', 'radd' and 'bd3lm' (n / k) sum_{l in M} -log p(x_0^l | x_M, t): RADD's any-order form with the
    time a time-conditioned network needs (t | k is Beta, not fixed). Unbiased for the same NELBO as
    `training_loss`, with weights <= n, where the uniform-t estimator puts weight 1/t on Binomial(n, t) masked
    tokens: its second moment grows like int dt / t, and rare rows drawn at tiny t carry estimates many
    times the mean. A lam outside the schedule's range [1 - alpha(0), 1 - alpha(1)] contributes 0 (that part
    of the integral does not exist: the boundary terms account for it). Pad positions are masked like the
    others, as in training, and loss_mask [B, L] selects the positions that count. 'radd' is MDLM's loss with
    alpha = 1 - lam and a time-free network; 'bd3lm' draws per block of block_size. Returns float32 [B].
    """
    if name not in COUNT_SAMPLED_LOSSES:
        raise ValueError(f"count_sampled_nelbo is for {COUNT_SAMPLED_LOSSES}, got {name!r}")
    _check_tokens("x0", x0)
    batch, length = x0.shape
    if name == "radd":
        schedule = schedules_lib.LinearSchedule()
    if name == "bd3lm" and block_size is None:
        raise ValueError("loss 'bd3lm' needs block_size")
    bs = block_size if name == "bd3lm" else length
    mask, lam, k = sample_masks_by_count(rng, batch, length, bs)
    t_blocks = schedule.t_from_alpha(1.0 - lam)  # [B, nb]
    valid = (t_blocks >= 0.0) & (t_blocks <= 1.0)
    t_blocks = jnp.clip(t_blocks, 0.0, 1.0)
    t = jnp.repeat(t_blocks, bs, axis=1)  # [B, L]
    xt = jnp.where(mask, mask_id, x0).astype(x0.dtype)
    if name == "radd":
        logits = apply_fn(xt, None, None)
    elif name == "bd3lm":
        logits = apply_fn(xt, t, x0)
    else:
        logits = apply_fn(xt, t_blocks[:, 0], None)
    if name == "sedd_absorb":
        per_token = score_entropy_absorbing_loss(
            sedd_absorbing_log_score(logits, t, schedule), x0, xt, t, schedule, mask_id
        )
    else:
        per_token = mdlm_loss(logits, x0, xt, t, schedule, mask_id)
    weight = jnp.repeat(jnp.where(valid, bs / k, 0.0), bs, axis=1) / schedule.mdlm_weight(t)
    counted = mask & jnp.repeat(valid, bs, axis=1)
    if loss_mask is not None:
        counted = counted & (loss_mask > 0)
    # where(), not a product: at an invalid (clipped) t the loss may be inf and its weight 0.
    return jnp.sum(jnp.where(counted, per_token * weight, 0.0), axis=1)


# --------------------------------------------------------------------------------------------
# Uniform-state diffusion with the mean parameterisation (UDLM, DUO) and DUO's curriculum
# --------------------------------------------------------------------------------------------


def duo_loss(logits, x0, xt, t, schedule):
    """The continuous-time NELBO of the uniform process with the mean parameterisation, per token (UDLM,
    Schiff et al. 2025; DUO, Sahoo et al. 2025, sec. 2; s-sahoo/duo `algo.py` DUO_BASE.nll_per_token). The
    network outputs x_theta = softmax(logits) [B, L, V] over the V ids of the uniform process; with
    a = alpha(t), a' = alpha'(t), xbar = V a x + (1 - a) 1 (x one-hot or x_theta) and r = (1 - a)/(V a + 1 - a):

        L = a'/(V a) [ V/xbar(x_0)[x_t] - V/xbar_theta[x_t]
                       + c (sum_j log xbar_theta[j] - V log xbar_theta[x_t])
                       + 1[x_t != x_0] V a/(1 - a) (log xbar_theta[x_0] - log xbar_theta[x_t])
                       - ((V - 1) r 1[x_t = x_0] - 1[x_t != x_0] / r) log r ],
        c = r if x_t = x_0 else 1,

    >= 0, and 0 at the exact reverse rates. Its minimiser is the leave-one-out posterior
    x_theta^l = p(x_0^l | x_t^{-l}) (the mean parameterisation's reverse step is exact then:
    `processes.UniformProcess.mean_posterior_probs`), and with it E_t E_{x_t}[sum_l L] = I(x_0; x_{t=0}) -
    I(x_0; x_{t=1}) exactly (tests/test_losses_fewstep.py); the NELBO adds `boundary_terms('duo', ...)`.
    Any schedule-like `schedule` with alpha(t), dalpha(t) works, the Gaussian relaxation's included
    (`processes.GaussianRelaxation`, the curriculum's). t [B] or [B, L]. Returns float32 [B, L]."""
    _check_logits("logits", logits, x0)
    _check_tokens("xt", xt, x0.shape)
    n = logits.shape[-1]
    log_x = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    _per_token_time(t, x0)  # checks t's shape
    t = _at_least_f32(t)
    # alpha and dalpha at t as given, broadcast to the tokens after: the relaxation's are quadratures.
    a = _per_token_time(schedule.alpha(t), x0, "alpha(t)").astype(log_x.dtype)
    da = _per_token_time(schedule.dalpha(t), x0, "dalpha(t)").astype(log_x.dtype)
    one_minus_a = 1.0 - a
    # log xbar_theta = log(V a x_theta + 1 - a), kept finite as a -> 0 or 1.
    log_xbar = jnp.logaddexp(jnp.log(n * a)[..., None] + log_x, jnp.log(one_minus_a)[..., None])
    log_xbar_xt = _gather(log_xbar, xt)
    log_xbar_x0 = _gather(log_xbar, x0)
    eq = xt == x0
    xbar_true_xt = one_minus_a + jnp.where(eq, n * a, 0.0)
    term1 = n * (1.0 / xbar_true_xt - jnp.exp(-log_xbar_xt))
    r = one_minus_a / (n * a + one_minus_a)
    coef = jnp.where(eq, r, 1.0)
    # The x_t != x_0 terms are where()d, not multiplied: at a = 1 their factors are infinite (such x_t has
    # probability 0 then), and 0 * inf would be NaN in the value or the gradient.
    safe_gap = jnp.where(eq, 1.0, one_minus_a)
    safe_r = jnp.where(eq, 1.0, r)
    jump = jnp.where(eq, 0.0, n * a / safe_gap * (log_xbar_x0 - log_xbar_xt))
    offset = jnp.where(eq, (n - 1) * jax.scipy.special.xlogy(r, r), -jnp.log(safe_r) / safe_r)
    term2 = -coef * (jnp.sum(log_xbar, axis=-1) - n * log_xbar_xt) - jump + offset
    return da / (n * a) * (term1 - term2)


@dataclasses.dataclass(frozen=True)
class DuoCurriculum:
    """DUO's Gaussian-relaxation curriculum (DUO sec. 4.1; s-sahoo/duo `algo.py` DUO.nll with
    curriculum.mode='simple', `_compute_gumbel_tau_inverse`): for training steps in [0, end) the network sees
    softmax(w_t / tau) of the Gaussian latent w_t (`processes.GaussianRelaxation`) instead of its argmax x_t,
    and the loss is `duo_loss` of x_t with the relaxation's alpha(t) (gamma in [gamma_min, gamma_max]): the
    soft input carries the margin of the argmax, a lower-variance signal early in training. log10 tau goes
    linearly from tau_log10_start at step `start` to tau_log10_end at `end` (DUO's OWT and LM1B runs: -3
    throughout, for the first 500k of 1M steps); from `end` on the plain loss (uniform noise at
    schedule.alpha(t)) trains. end = 0: no curriculum."""

    relaxation: processes.GaussianRelaxation
    tau_log10_start: float = -3.0
    tau_log10_end: float = -3.0
    start: int = 0
    end: int = 0

    def active(self, step):
        return jnp.asarray(step) < self.end

    def inverse_temperature(self, step):
        """1 / tau at `step` (before `start`: tau_log10_start, as DUO)."""
        span = max(self.end - self.start, 1)
        frac = jnp.clip((jnp.asarray(step, jnp.float32) - self.start) / span, 0.0, 1.0)
        log10_tau = self.tau_log10_start + frac * (self.tau_log10_end - self.tau_log10_start)
        return 10.0 ** (-log10_tau)


def duo_relaxed_inputs(rng, x0, t, relaxation: processes.GaussianRelaxation, inverse_temperature):
    """(soft inputs softmax(w_t / tau) float32 [B, L, V], x_t = argmax w_t int [B, L]) of DUO's curriculum."""
    w = relaxation.sample_latent(rng, x0, t)
    xt = jnp.argmax(w, axis=-1).astype(x0.dtype)
    return jax.nn.softmax(w * inverse_temperature, axis=-1), xt


def network_time(schedule: schedules_lib.Schedule, alpha):
    """The time of `schedule` with keep-probability `alpha`, clipped to [0, 1]: what a network trained on
    `schedule` is told when another process (the curriculum's relaxation, DCD's Gaussian pairs) produced a
    state at that noise level (DUO feeds its network sigma = -log alpha, the same information)."""
    return jnp.clip(schedule.t_from_alpha(alpha), 0.0, 1.0)


def duo_log_ratios(logits, xt, alpha):
    """The log ratios log p_t(x_t^{l <- y}) / p_t(x_t) [B, L, V] that a mean-parameterised network implies
    (UDLM / DUO: the reverse rate to y is -alpha'/(V alpha) xbar_theta[y] / xbar_theta[x_t^l] with xbar_theta =
    V alpha x_theta + (1 - alpha) 1, while the true one is -alpha'/(V alpha) p_t(x_t^{l <- y}) / p_t(x_t)):

        log xbar_theta[y] - log xbar_theta[x_t^l],   x_theta = softmax(logits),

    exact when x_theta is the leave-one-out posterior p(x_0^l | x_t^{-l}) (the loss's minimiser). This is what the
    uniform graph's score samplers (`ddlm.sampling.score`, SEDD's) take, so a DUO network samples through them.
    logits [B, L, V], xt int [B, L], alpha = schedule.alpha(t): [B] or [B, L]."""
    log_x = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    n = logits.shape[-1]
    a = _per_token_time(alpha, xt, "alpha").astype(log_x.dtype)[..., None]
    log_xbar = jnp.logaddexp(jnp.log(n * a) + log_x, jnp.log1p(-a))
    return log_xbar - _gather(log_xbar, xt)[..., None]


# --------------------------------------------------------------------------------------------
# Self-conditioning: the second pass on the network's own previous prediction
# --------------------------------------------------------------------------------------------


def self_conditioned_apply(apply_fn: "ApplyFn", rng, probability: float) -> "ApplyFn":
    """apply_fn(xt, t, ctx) with self-conditioning (Chen et al. 2023, "Analog Bits", sec. 3.2; DiffusionGemma's
    `call_with_self_conditioning`): a first pass without the signal (self_cond=None: zeros), its prediction
    softmax(logits) taken as a constant (stop_gradient), and the returned logits from a second pass that sees
    it, for each row with probability `probability` (the others see zeros, as at a sampler's first step).
    The loss is whatever the caller computes from the returned logits, so any objective can use it.
    apply_fn must accept self_cond=float [B, L, V] | None. Two network passes per call."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"self-conditioning probability must be in [0, 1], got {probability}")

    def apply(xt, t, ctx):
        first = jax.lax.stop_gradient(apply_fn(xt, t, ctx, self_cond=None))
        probs = jax.nn.softmax(_at_least_f32(first), axis=-1)
        use = jax.random.bernoulli(rng, probability, (first.shape[0],))
        return apply_fn(xt, t, ctx, self_cond=jnp.where(use[:, None, None], probs, 0.0))

    return apply


# --------------------------------------------------------------------------------------------
# Distillation: SDTT (masked) and DCD (uniform-state) targets and divergences
# --------------------------------------------------------------------------------------------

DIVERGENCES = ("kl_reverse", "kl_forward")


def distillation_divergence(student_logits, teacher_log_probs, divergence: str = "kl_reverse"):
    """Per-token divergence between the student's softmax(student_logits) = q and the teacher's p =
    exp(teacher_log_probs), [B, L, V] -> float32 [B, L]:

        kl_reverse  KL(q || p) = sum_v q (log q - log p)   (SDTT's and DCD's default 'kl-bwd')
        kl_forward  KL(p || q) = sum_v p (log p - log q)   ('kl-fwd')

    0 iff q = p. Teacher entries of probability 0 (SUBS's mask column: log p ~ -1e6) add p log p = 0 to the
    forward KL; the student's own mask column is as small, so q log p stays finite in the reverse one."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    log_q = jax.nn.log_softmax(_at_least_f32(student_logits), axis=-1)
    log_p = _at_least_f32(teacher_log_probs)
    if divergence == "kl_reverse":
        return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def sdtt_target(teacher_fn, rng, xt, t, *, dt: float, num_steps: int, schedule, mask_id: int):
    """SDTT's teacher target (Deschenaux & Gulcehre 2025, "Beyond Autoregression: Discrete Diffusion for
    Long-Context Text", Alg. 1; jdeschena/sdtt `multi_round_sdtt.py` _teacher_logprobs_on_mask): the teacher
    runs `num_steps` ancestral steps of size dt from x_t (t -> t - dt -> ... -> t - num_steps dt, clipped at 0),
    each revealing a masked token with probability (alpha(s) - alpha(t_k)) / (1 - alpha(t_k)) as a draw from its
    prediction; a position's target is the teacher's log p(x_0 | x_{t_k}) (SUBS) at the step that revealed it,
    or at the last step for one still masked. (The reference's start times are t s_k + (1 - t)(t - num_steps dt)
    with s_k = linspace(1, 0, num_steps), each step of size dt, clamped at sampling_eps: its interpolation
    weights are not s_k and 1 - s_k, so the steps neither start at t nor tile [t - num_steps dt, t]; here step
    k starts where step k - 1 ended, the several-step ancestral sampler SDTT describes.) teacher_fn(x [B, L],
    t [B]) -> logits [B, L, V]; xt int [B, L]; t [B]. Returns (log-probs float32 [B, L, V], x after the steps).

    With one step the target is the teacher's prediction at x_t. With more it is not p(x_0 | x_t) even for the
    exact denoiser: a step reveals several tokens independently from their marginals, and the target's mean is
    that factorised several-step sampler's (tests/test_losses_fewstep.py enumerates it), the output a
    one-step student is trained to reproduce."""
    if num_steps < 1:
        raise ValueError(f"sdtt needs num_steps >= 1 teacher steps, got {num_steps}")
    batch = xt.shape[0]
    target = None
    x = xt
    for k in range(num_steps):
        t_k = jnp.clip(t - k * dt, 0.0, 1.0)
        s_k = jnp.clip(t - (k + 1) * dt, 0.0, 1.0)
        log_p = subs_log_probs(teacher_fn(x, jnp.broadcast_to(t_k, (batch,))), x, mask_id)
        a_t, a_s = schedule.alpha(t_k), schedule.alpha(s_k)
        reveal_prob = jnp.where(a_t < 1.0, (a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-30), 1.0)
        coin_rng, draw_rng, rng = jax.random.split(rng, 3)
        coin = jax.random.uniform(coin_rng, x.shape) < reveal_prob[:, None]
        draw = jax.random.categorical(draw_rng, log_p, axis=-1).astype(x.dtype)
        now = (x == mask_id) & coin
        target = log_p if target is None else jnp.where(now[..., None], log_p, target)
        # A position revealed at an earlier step keeps that step's prediction: `now` holds masked ones only.
        x = jnp.where(now, draw, x)
    target = jnp.where((x == mask_id)[..., None], log_p, target)
    return target, x


def sdtt_loss(student_logits, target_log_probs, xt, mask_id: int, divergence: str = "kl_reverse"):
    """SDTT's per-token loss: the divergence between the student's SUBS prediction at x_t and the teacher's
    several-step target, at masked positions; 0 elsewhere. The trainer averages it over the masked tokens
    (SDTT's `batchmean` over the masked rows). Returns float32 [B, L]."""
    student = subs_log_probs(student_logits, xt, mask_id)
    per = distillation_divergence(student, target_log_probs, divergence)
    return jnp.where(xt == mask_id, per, 0.0)


def sdtt_dt(step, *, base_steps: int = 1024, grow_every: int = 10_000, num_steps: int = 2, sampling_eps=1e-3):
    """SDTT's teacher step size at optimizer `step` (jdeschena/sdtt `multi_round_sdtt.py` training_step): round
    r = step // grow_every distils a (base_steps / num_steps^r)-step sampler, dt = (1 - eps) num_steps^r /
    base_steps; each new round copies the student into the teacher (the trainer's business)."""
    rounds = jnp.asarray(step) // grow_every
    return (1.0 - sampling_eps) / base_steps * jnp.asarray(num_steps, jnp.float32) ** rounds


def dcd_dt(step, *, base_steps: int = 512, update_teacher_every: int = 10_000):
    """DCD's pair gap at optimizer `step` (s-sahoo/duo `algo.py` Distillation._compute_dt, linear_growth_dt
    off): dt = 2^(step // update_teacher_every) / T, doubling each time the teacher is refreshed (T = algo.T,
    512 in `scripts/distil_owt.sh`)."""
    return 2.0 ** (jnp.asarray(step) // update_teacher_every).astype(jnp.float32) / base_steps


def dcd_pair(rng, x0, t, dt: float, relaxation: processes.GaussianRelaxation):
    """DCD's pair of states (DUO Alg. 1; s-sahoo/duo `algo.py` Distillation._sample_trajectory and nll):
    t' = min(t + dt, 1), s = t' - dt, and one Gaussian draw eps shared by both ends, so that (x_t', x_s) =
    (argmax w_t', argmax w_s) lie on one deterministic trajectory of the Gaussian diffusion (its probability-flow
    ODE with the true x_0). Returns (x_t', x_s, t', s) with x int [B, L] and t', s [B]. DCD's loss is then
    distillation_divergence(student(x_t', t'), log_softmax(teacher(x_s, s)), 'kl_reverse') per token, the
    networks told their times through `network_time` (the reference's kl-bwd on both mean-parameterised
    log x_theta, teacher refreshed every update_teacher_every steps: `dcd_dt`)."""
    t_hi = jnp.clip(t + dt, 0.0, 1.0)
    s = t_hi - dt
    eps = jax.random.normal(rng, x0.shape + (relaxation.vocab_size,), jnp.float32)
    xt = jnp.argmax(relaxation.sample_latent(None, x0, t_hi, noise=eps), axis=-1).astype(x0.dtype)
    xs = jnp.argmax(relaxation.sample_latent(None, x0, s, noise=eps), axis=-1).astype(x0.dtype)
    return xt, xs, t_hi, s


# --------------------------------------------------------------------------------------------
# The glue the trainer calls
# --------------------------------------------------------------------------------------------

LOSSES = ("mdlm", "d3pm", "sedd_absorb", "sedd_uniform", "radd", "bd3lm", "ar", "sft", "duo")

# apply_fn(xt [B, L] int, t [B] | [B, L] | None, x0_context [B, L] | None) -> logits [B, L, V]
ApplyFn = Callable[..., jax.Array]


def _network_output(apply_fn: ApplyFn, vocab_size: int, xt, t, x0_context):
    """apply_fn(xt, t, x0_context), checked to be [batch, length, vocab_size]: a network with another number
    of columns would score ids the forward process never draws, or miss ids it does (a biased loss)."""
    out = apply_fn(xt, t, x0_context)
    if out.ndim != 3 or tuple(out.shape) != (*xt.shape[:2], vocab_size):
        raise ValueError(
            f"the network's output must be [batch, length, vocab_size] = {(*xt.shape[:2], vocab_size)} "
            f"(vocab_size counts every id, the mask id included), got {tuple(out.shape)}"
        )
    return out


def _duo_training_loss(apply_fn, x0, loss_mask, t, x_rng, schedule, vocab_size, step, curriculum):
    """training_loss's 'duo' branch: the plain NELBO, or DUO's curriculum while curriculum.active(step)."""

    def plain():
        xt = processes.UniformProcess(vocab_size).sample_xt(x_rng, x0, schedule.alpha(t))
        return duo_loss(_network_output(apply_fn, vocab_size, xt, t, None), x0, xt, t, schedule)

    if curriculum is None or step is None:
        return masked_mean(plain(), loss_mask), {}
    relax = curriculum.relaxation
    if relax.vocab_size != vocab_size:
        raise ValueError(
            f"the curriculum's relaxation has vocab_size={relax.vocab_size}, the network {vocab_size}"
        )

    def relaxed():
        soft, xt = duo_relaxed_inputs(x_rng, x0, t, relax, curriculum.inverse_temperature(step))
        logits = _network_output(apply_fn, vocab_size, soft, network_time(schedule, relax.alpha(t)), None)
        return duo_loss(logits, x0, xt, t, relax)

    active = curriculum.active(step)
    per_token = jax.lax.cond(active, relaxed, plain)
    return masked_mean(per_token, loss_mask), {"curriculum": active.astype(jnp.float32)}


def training_loss(
    name: str,
    apply_fn: ApplyFn,
    x0,
    loss_mask,
    rng,
    *,
    schedule: schedules_lib.Schedule | None,
    vocab_size: int,
    mask_id: int | None,
    block_size: int | None = None,
    num_steps: int | None = None,
    antithetic: bool = True,
    check_ids: bool = False,
    step=None,
    curriculum: DuoCurriculum | None = None,
    self_conditioning: float = 0.0,
):
    """One Monte-Carlo estimate of the named loss for a batch of clean sequences x0 [B, L].

    Samples t (low-discrepancy if `antithetic`), corrupts x0, calls `apply_fn(xt, t, x0_context)` and
    returns (masked mean per token in nats, metrics). For the diffusion losses the mean is an unbiased
    estimate of the NELBO per token. `t` passed to apply_fn is [B] (per-token [B, L] for 'bd3lm', None for
    the time-free 'radd' and for 'ar'); x0_context is x0 for 'bd3lm' (block-causal network), else None.
    For 'sft' (LLaDA's SFT), loss_mask marks the response: positions where it is 0 are the prompt, kept
    clean, and the result is `sft_mean` (per-example normalisation) instead of the masked token mean.
    The network's output must be [B, L, vocab_size] (a ValueError otherwise). With check_ids=True, call
    under `checkify.checkify` to validate token ids.

    'duo' (the uniform process, `duo_loss`): with a `curriculum` and the optimizer `step` (training), steps
    before curriculum.end show the network DUO's relaxed inputs softmax(w_t / tau) float32 [B, L, V] (at the
    time of `schedule` with the same alpha) and score their argmax with the relaxation's alpha; otherwise
    (and in eval: step None) x_t ~ q_t and the NELBO. self_conditioning in (0, 1]: the network is called
    through `self_conditioned_apply` with that probability (apply_fn then takes self_cond=...).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    _check_tokens("x0", x0)
    batch, length = x0.shape
    if loss_mask is None:
        loss_mask = jnp.ones(x0.shape, jnp.float32)
    if check_ids:
        check_token_ids(x0, vocab_size, "x0", mask_id if name not in ("ar", "sedd_uniform", "duo") else None)
    if self_conditioning:
        # Its own stream (fold_in), so that the other draws are those of a run without it.
        apply_fn = self_conditioned_apply(apply_fn, jax.random.fold_in(rng, 0x5C), self_conditioning)
    t_rng, x_rng = jax.random.split(rng)

    if name == "ar":
        per_token = autoregressive_loss(_network_output(apply_fn, vocab_size, x0, None, None), x0, mask_id)
        return masked_mean(per_token, loss_mask[:, 1:]), {}

    if name in ("mdlm", "d3pm", "sedd_absorb", "radd", "bd3lm", "sft") and mask_id is None:
        raise ValueError(f"loss {name!r} uses the absorbing graph and needs mask_id")
    if name != "radd" and schedule is None:
        raise ValueError(f"loss {name!r} needs a noise schedule")

    if name == "bd3lm":
        if block_size is None:
            raise ValueError("loss 'bd3lm' needs block_size")
        num_blocks = length // block_size
        t_blocks = sample_times(t_rng, batch * num_blocks, antithetic).reshape(batch, num_blocks)
        t = block_times_to_tokens(t_blocks, block_size, length)
        xt = processes.AbsorbingProcess(vocab_size, mask_id).sample_xt(x_rng, x0, schedule.alpha(t))
        logits = _network_output(apply_fn, vocab_size, xt, t, x0)
        per_token = block_diffusion_loss(logits, x0, xt, t_blocks, schedule, mask_id, block_size)
        return masked_mean(per_token, loss_mask), {"mask_rate": jnp.mean(xt == mask_id)}

    t = sample_times(t_rng, batch, antithetic)
    if name == "sft":
        # LLaDA SFT: the prompt (loss_mask == 0) is never noised; the response, eos padding included, is
        # masked at rate 1 - alpha(t) and scored with the masked-diffusion weight, per example (sft_mean).
        response = loss_mask > 0
        alpha = jnp.where(response, schedule.alpha(t)[:, None], 1.0)
        xt = processes.AbsorbingProcess(vocab_size, mask_id).sample_xt(x_rng, x0, alpha)
        per_token = mdlm_loss(
            _network_output(apply_fn, vocab_size, xt, t, None), x0, xt, t, schedule, mask_id
        )
        return sft_mean(per_token, loss_mask), {"mask_rate": masked_mean(xt == mask_id, loss_mask)}

    if name == "radd":
        xt = processes.AbsorbingProcess(vocab_size, mask_id).sample_xt(x_rng, x0, 1.0 - t)
        per_token = radd_loss(_network_output(apply_fn, vocab_size, xt, None, None), x0, xt, t, mask_id)
        return masked_mean(per_token, loss_mask), {"mask_rate": jnp.mean(xt == mask_id)}

    if name == "d3pm":
        if num_steps is None:
            raise ValueError("loss 'd3pm' needs num_steps")
        t = discretize_times(t, num_steps)

    if name == "duo":
        return _duo_training_loss(
            apply_fn, x0, loss_mask, t, x_rng, schedule, vocab_size, step, curriculum
        )

    if name == "sedd_uniform":
        xt = processes.UniformProcess(vocab_size).sample_xt(x_rng, x0, schedule.alpha(t))
        per_token = score_entropy_uniform_loss(
            _network_output(apply_fn, vocab_size, xt, t, None), x0, xt, t, schedule
        )
        return masked_mean(per_token, loss_mask), {}

    xt = processes.AbsorbingProcess(vocab_size, mask_id).sample_xt(x_rng, x0, schedule.alpha(t))
    logits = _network_output(apply_fn, vocab_size, xt, t, None)
    if name == "mdlm":
        per_token = mdlm_loss(logits, x0, xt, t, schedule, mask_id)
    elif name == "d3pm":
        per_token = d3pm_absorbing_loss(logits, x0, xt, t, schedule, mask_id, num_steps)
    else:  # sedd_absorb
        log_score = sedd_absorbing_log_score(logits, t, schedule)
        per_token = score_entropy_absorbing_loss(log_score, x0, xt, t, schedule, mask_id)
    return masked_mean(per_token, loss_mask), {"mask_rate": jnp.mean(xt == mask_id)}


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning (LLaDA) and the conditional likelihood of a response
# --------------------------------------------------------------------------------------------


def sft_mean(per_token, response_mask):
    """LLaDA's SFT normalisation (LLaDA GUIDELINES.md, 'SFT': `token_loss / answer_lengths`, summed, over
    the batch size): each example's loss is summed over its response positions and divided by its
    response length R_b (eos padding included), then averaged over the batch,

        loss = 1/B sum_b 1/R_b sum_l per_token[b, l] response_mask[b, l].

    With the masked-diffusion per-token loss, 1/R_b times the sum is an unbiased estimate of the NELBO of
    the response given the prompt, per response token (LLaDA's SFT objective). A row without response
    positions counts as 0. per_token, response_mask: [B, L]. Returns a float32 scalar.
    """
    per_token = _at_least_f32(per_token)
    if response_mask.shape != per_token.shape:
        raise ValueError(
            f"response_mask must have shape {tuple(per_token.shape)}, got {tuple(response_mask.shape)}"
        )
    mask = response_mask.astype(per_token.dtype)
    lengths = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.mean(jnp.sum(per_token * mask, axis=1) / lengths)


def sample_response_mask(rng, response_mask, stratified: bool = True):
    """For `any_order_conditional_loss`: bool [B, L] masks with, in row b, l_b ~ U{1..R_b} of its R_b
    response positions (response_mask [B, L] nonzero) masked, chosen uniformly at random; nothing else is
    masked (LLaDA eval_llada.py `_forward_process`). Rows without response positions mask nothing.

    stratified: l_b = floor(u_b R_b) + 1 with u = sample_times(antithetic=True): each l_b is still uniform
    on 1..R_b (so estimates stay unbiased), while a batch covers 1..R evenly (LLaDA spreads l over the
    batch with a linspace and one random offset, to the same end)."""
    l_rng, perm_rng = jax.random.split(rng)
    response = response_mask > 0
    batch, length = response.shape
    r = jnp.sum(response, axis=1)
    u = sample_times(l_rng, batch, antithetic=stratified)
    num_masked = jnp.minimum(jnp.floor(u * r).astype(jnp.int32) + 1, r)  # min: u * r may round up to r
    keys = jnp.where(response, jax.random.uniform(perm_rng, (batch, length)), 2.0)
    ranks = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)  # response positions take ranks 0..R_b-1
    return response & (ranks < num_masked[:, None])


def any_order_conditional_loss(logits, x0, xt, mask_id: int, response_mask):
    """The any-order bound on -log p(response | prompt) (LLaDA's conditional likelihood estimate; RADD's
    AO-ARM form, `radd_any_order_loss`, restricted to the response): with R response positions and l of
    them masked, uniformly, for l ~ U{1..R} (`sample_response_mask`),

        -log p(r | p) <= E_l E_{|M| = l} [ R/l sum_{i in M} -log p_theta(r^i | p, r with M masked) ].

    The bound is an equality for exact conditionals: it averages the chain rule over all orders. The
    prompt (response_mask == 0) must be unmasked in xt. l is read off xt. Returns float32 [B, L] (0 off
    the masked response positions).
    """
    nll = _masked_nll(logits, x0, xt, mask_id)
    response = response_mask > 0
    r = jnp.sum(response, axis=1, keepdims=True).astype(nll.dtype)
    k = jnp.sum((xt == mask_id) & response, axis=1, keepdims=True).astype(nll.dtype)
    return jnp.where(response, nll * r / jnp.maximum(k, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# Policy optimisation with verifiable rewards (diffu-GRPO, wd1): sequence log-likelihood estimates of a
# response given its prompt, group-relative advantages, the policy losses. ddlm/train/rl.py is the plumbing
# (rollouts, rewards, the reference); these are the math. Rows are [prompt | response] with
# response_mask [B, L] > 0 on the response (eos padding included, as in SFT rows).
# --------------------------------------------------------------------------------------------


def masked_fraction_time(xt, mask_id: int):
    """t [B] = the masked fraction of each row of xt [B, L]: the time of the linear schedule (alpha = 1 - t)
    whose expected masked fraction the row has; what a time-conditioned network is shown by the estimators
    below (time-free networks, LLaDA's and d1's, ignore it)."""
    return jnp.mean((xt == mask_id).astype(jnp.float32), axis=-1)


def prompt_masked_input(rng, x0, response_mask, mask_id: int, p_mask: float):
    """d1's input of the one-step estimate (Zhao et al. 2025, "d1", sec. 3.2): the whole response masked and
    each prompt position masked independently with probability p_mask (d1: 0.15), so that successive
    gradient steps on one batch of rollouts see different views of the prompt. x0, response_mask: [B, L].
    Returns int [B, L]."""
    _check_tokens("x0", x0)
    response = response_mask > 0
    hide = jax.random.uniform(rng, x0.shape) < p_mask
    return jnp.where(response | hide, mask_id, x0).astype(x0.dtype)


def mean_field_log_probs(logits, x0, response_mask, mask_id: int):
    """Per-token log p_theta(x0^l | x_t) at response positions, 0 elsewhere: float32 [B, L]. With x_t from
    `prompt_masked_input` (every response token masked) the sum over l is diffu-GRPO's mean-field estimate
    of log pi(response | prompt): one network call, each token scored as if the others were unknown."""
    xt = jnp.where(response_mask > 0, mask_id, x0).astype(x0.dtype)  # only the masked response is scored
    return jnp.where(response_mask > 0, -_masked_nll(logits, x0, xt, mask_id), 0.0)


def mean_field_log_prob(apply_fn: ApplyFn, x0, response_mask, rng, *, mask_id: int, p_mask: float):
    """diffu-GRPO's one-step estimate: (per-token log-probs float32 [B, L], their sum per row [B]) of the
    response given the prompt masked at rate p_mask (`prompt_masked_input`). The same rng gives the same
    prompt mask, so a policy and its reference (or old policy) scored with one rng share it. Not unbiased
    for log pi(response | prompt): it ignores the dependence between response tokens (mean field) and the
    prompt masking; tests/test_rl.py measures both against the exact oracle."""
    xt = prompt_masked_input(rng, x0, response_mask, mask_id, p_mask)
    logits = apply_fn(xt, masked_fraction_time(xt, mask_id), None)
    per_token = mean_field_log_probs(logits, x0, response_mask, mask_id)
    return per_token, jnp.sum(per_token, axis=1)


def stratified_response_masks(rng, response_mask, num_samples: int):
    """For `nelbo_log_prob`: K = num_samples masks per row, bool [B, K, L]. Sample k of row b masks
    l_bk ~ U{1..R_b} of its R_b response positions, uniformly chosen, where the K counts of a row are
    stratified (antithetic): l_bk = floor(((u_b + k/K) mod 1) R_b) + 1 with one u_b ~ U[0, 1). Each l_bk is
    still uniform (unbiased), while the K samples of a row cover 1..R_b evenly (LLaDA-1.5's VRPO, "optimal
    allocation": spread the budget over the mask levels)."""
    l_rng, perm_rng = jax.random.split(rng)
    response = response_mask > 0
    batch, length = response.shape
    r = jnp.sum(response, axis=1)[:, None]  # [B, 1]
    u = jnp.mod(jax.random.uniform(l_rng, (batch, 1)) + jnp.arange(num_samples) / num_samples, 1.0)
    count = jnp.minimum(jnp.floor(u * r).astype(jnp.int32) + 1, r)  # [B, K]
    keys = jnp.where(response[:, None], jax.random.uniform(perm_rng, (batch, num_samples, length)), 2.0)
    ranks = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)  # response positions take ranks 0..R_b-1
    return response[:, None] & (ranks < count[..., None])


def nelbo_log_prob(apply_fn: ApplyFn, x0, response_mask, rng, *, mask_id: int, num_samples: int):
    """The NELBO-based estimate of log pi(response | prompt) (wd1 / LLaDA-1.5 VRPO style): minus the
    any-order bound `any_order_conditional_loss` averaged over K = num_samples masks per row
    (`stratified_response_masks`), the prompt always visible:

        log pi(r | p) >= E_l E_{|M| = l} [ R/l sum_{i in M} log p_theta(r^i | p, r with M masked) ] ~= mean_k Y_k,

    an equality for exact conditionals (the bound averages the chain rule over all orders). The masks
    depend on rng and response_mask only, so a policy and its reference scored with one rng see the same
    masks (VRPO's shared noise): the noise of the two estimates cancels in their difference. One network
    call on [B * K, L]. Returns (per-sample estimates float32 [B, K], their mean [B])."""
    _check_tokens("x0", x0)
    batch, length = x0.shape
    masks = stratified_response_masks(rng, response_mask, num_samples)  # [B, K, L]
    x0_k = jnp.repeat(x0, num_samples, axis=0)
    resp_k = jnp.repeat(response_mask, num_samples, axis=0)
    xt = jnp.where(masks.reshape(batch * num_samples, length), mask_id, x0_k).astype(x0.dtype)
    logits = apply_fn(xt, masked_fraction_time(xt, mask_id), None)
    per_token = any_order_conditional_loss(logits, x0_k, xt, mask_id, resp_k)
    samples = -jnp.sum(per_token, axis=1).reshape(batch, num_samples)
    return samples, jnp.mean(samples, axis=1)


def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-4):
    """GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath eq. 3 "outcome supervision"): rows
    come in consecutive groups of group_size completions of one prompt, and

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)     (scale=True; std with Bessel's correction,
                                                                as TRL's GRPOTrainer, on which d1 builds)
        A_i = r_i - mean_group(r)                              (scale=False: Dr. GRPO / d1's option)

    rewards: [N * group_size]. Returns float32 [N * group_size]; a group whose rewards are all equal gets 0."""
    rewards = _at_least_f32(rewards)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [num_prompts * group_size] with group_size={group_size}, got {tuple(rewards.shape)}"
        )
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
    groups = rewards.reshape(-1, group_size)
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def k3_kl(log_p, log_ref):
    """Schulman's k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = log_ref - log_p
    (>= 0, unbiased; what GRPO adds per token)."""
    d = log_ref - log_p
    return jnp.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, advantages, unit_mask, *, clip_eps: float, beta: float = 0.0, ref_logp=None):
    """GRPO's clipped surrogate (DeepSeekMath eq. 3; d1 eq. 4 with its per-token estimates) as a loss:

        per unit u of row i:  -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta k3_kl(logp, ref_logp),
        rho = exp(logp - old_logp),   loss = mean_i [ sum_u per * mask / sum_u mask ]   (TRL's normalisation)

    logp, old_logp, ref_logp, unit_mask: [B, U] (U = positions for a per-token estimate, 1 for a sequence
    estimate); advantages [B]. old_logp = stop_gradient(logp) (one update per batch of rollouts) makes rho = 1
    and the gradient -A grad logp, the policy gradient. Returns (scalar, metrics: 'kl' (mean k3 per unit,
    0 without a reference), 'clip_fraction', 'ratio')."""
    logp, old_logp = _at_least_f32(logp), _at_least_f32(old_logp)
    mask = unit_mask.astype(logp.dtype)
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.ndim != 2:
        raise ValueError(
            f"logp, old_logp and unit_mask must share one shape [batch, units], got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    adv = _at_least_f32(advantages)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per = -jnp.minimum(ratio * adv, clipped * adv)
    kl = jnp.zeros_like(per)
    if beta and ref_logp is not None:
        kl = k3_kl(logp, _at_least_f32(ref_logp))
        per = per + beta * kl
    units = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    loss = jnp.mean(jnp.sum(per * mask, axis=1) / units)
    mean_units = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "kl": mean_units(kl),
        "clip_fraction": mean_units((jnp.abs(ratio - 1.0) > clip_eps).astype(per.dtype)),
        "ratio": mean_units(ratio),
    }
    return loss, metrics


def weighted_likelihood_loss(logp, advantages, group_size: int, *, psi: float = 1.0):
    """wd1's ratio-free objective (Tang et al. 2025, "wd1: Weighted Policy Optimization for Reasoning in
    Diffusion Language Models", eq. 9) as a loss: within each group,

        loss = mean_groups sum_i ( w-_i - w+_i ) logp_i,    w+ = softmax_group(psi A),  w- = softmax_group(-psi A):

    raise the likelihood of completions in proportion to exp(psi A) (the reverse-KL-regularised optimal
    policy pi_ref exp(A / beta), psi = 1 / beta, sampled from the old policy) and lower it for the
    worst. No ratio to an old policy: one likelihood estimate per completion (e.g. `nelbo_log_prob`).
    logp, advantages: [N * group_size] (any per-sequence estimate). Returns a scalar."""
    logp = _at_least_f32(logp).reshape(-1, group_size)
    a = _at_least_f32(advantages).reshape(-1, group_size)
    w_pos = jax.nn.softmax(psi * a, axis=1)
    w_neg = jax.nn.softmax(-psi * a, axis=1)
    return jnp.mean(jnp.sum((w_neg - w_pos) * logp, axis=1))
