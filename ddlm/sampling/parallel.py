"""Masked-diffusion parallel decoding: semi-autoregressive blocks, a commit rule per step, one jitted loop.

    out = parallel_sample(denoise_fn, rng, x_init, mask_id=m, schedule=s, rule='threshold', threshold=0.9,
                          block_length=32)       # SampleOutput(tokens [B, L], nfe, trajectory)

The sequence is cut into blocks of `block_length` positions decoded left to right (LLaDA's semi-
autoregressive sampling, Nie et al. 2025; block_length 0 = one block). A step of a block:

  1. the logits of the block come from the logits provider (by default denoise_fn on the whole sequence,
     at the time t whose alpha(t) is the sequence's unmasked fraction);
  2. every masked position of the block draws a candidate from p_theta(x_0 | x_t) (float64 Gumbel noise,
     temperature / top-k / top-p; temperature 0 takes the argmax, LLaDA's default);
  3. the commit rule (ddlm.sampling.rules) keeps some candidates; the others are dropped and stay
     masked. This is LLaDA's "remasking" (predict every masked token, remask the low-confidence ones):
     rule='low_confidence' with steps = number of steps is exactly LLaDA's generate();
  4. optionally ReMDM remasking (Wang et al. 2025): tokens of the block decoded at earlier steps are
     remasked with probability sigma (masked.remasking_sigma) on the block's linear time grid.

Fixed-count rules (random, low_confidence, margin, entropy) commit LLaDA's number per step, so each block
takes steps / num_blocks steps; adaptive rules (threshold, factor, entropy_bounded) take as many steps as
they need (at most block_length), `steps` unused. Prompt, infill and constrained positions (x_init !=
mask_id) are never changed. The batch moves in lockstep: a block ends when no row has a masked
position in it, and a row whose block is decoded is left as it is (no remasking: its law is that of a
batch of one); nfe counts the network calls (batch-wide). With rule='random' and one token per step
this samples the exact model distribution, like the first-hitting sampler.

A cache plugs in by swapping the logits provider (one function):

    provider = LogitsProvider(init, logits)
        init(x_init [B, L]) -> state
        logits(state, x [B, L], block int32 [], step int32 []) -> (logits [B, block_length, V], state,
                                                                   calls int32 [])

`step` counts from 0 inside each block, so a provider implements its refresh policy (every step, every
k steps, once per block) by testing it; `calls` is the network calls it made (0 when it reused logits).
full_logits_provider(..., refresh=refresh_every(k)) is the simplest such policy: the last full call's
logits reused between refreshes. Fast-dLLM's prefix and dual KV caches are such providers
(ddlm.sampling.caches, config.sampler.cache).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddlm import schedules as schedules_lib
from ddlm.sampling import categorical, masked, rules
from ddlm.sampling.masked import DenoiseFn, SampleOutput


class LogitsProvider(NamedTuple):
    init: Callable[[jax.Array], Any]
    logits: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any, jax.Array]]


def sequence_time(x, mask_id: int, schedule: schedules_lib.Schedule):
    """t [B] with alpha(t) = the unmasked fraction of each row of x [B, L] (time-conditioned networks)."""
    masked_fraction = jnp.mean((x == mask_id).astype(jnp.float32), axis=-1)
    return jnp.clip(schedule.t_from_alpha(1.0 - masked_fraction), 0.0, 1.0).astype(jnp.float32)


def refresh_every(k: int) -> Callable[..., jax.Array]:
    """Refresh policy: call the network at steps 0, k, 2k, ... of each block (k >= 1). It takes
    (block, step) here and (block, step, state, x) in the caches (ddlm.sampling.caches); it reads only step."""
    if k < 1:
        raise ValueError(f"refresh_every: k must be >= 1, got {k}")
    return lambda block, step, *state_and_x: step % k == 0


def full_logits_provider(
    denoise_fn: DenoiseFn,
    *,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    block_length: int,
    refresh: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> LogitsProvider:
    """The default provider: denoise_fn on the whole sequence, sliced to the current block.

    refresh(block, step) -> bool []: when given, the network is called only at the steps where it is True
    (and always at a block's step 0); in between, the last call's logits are reused (an approximation).
    """

    def block_logits(x, block):
        logits = denoise_fn(x, sequence_time(x, mask_id, schedule)).astype(jnp.float32)
        return jax.lax.dynamic_slice_in_dim(logits, block * block_length, block_length, axis=1)

    if refresh is None:
        return LogitsProvider(
            init=lambda x: (),
            logits=lambda state, x, block, step: (block_logits(x, block), state, jnp.ones((), jnp.int32)),
        )

    def init(x):
        shape = jax.eval_shape(block_logits, x, jnp.zeros((), jnp.int32))
        return jnp.zeros(shape.shape, shape.dtype)

    def logits(state, x, block, step):
        call = jnp.logical_or(step == 0, refresh(block, step))
        out = jax.lax.cond(call, lambda: block_logits(x, block), lambda: state)
        return out, out, call.astype(jnp.int32)

    return LogitsProvider(init, logits)


class Plan(NamedTuple):
    block_length: int
    num_blocks: int
    steps_per_block: int  # LLaDA's steps per block (fixed-count rules); block_length for adaptive ones
    budget: int  # the most steps a block may take (sizes the trajectory)


def plan(length: int, *, rule: str, steps: int, block_length: int, remasking: str = "none") -> Plan:
    """Blocks and step budget for a sequence of `length`; every bad combination is one ValueError that
    names the config field."""
    commit_rule = rules.get_rule(rule)
    if block_length < 0 or (block_length and length % block_length):
        raise ValueError(
            f"config.sampler.block_length={block_length} must divide the sequence length {length} "
            "(0 = one block)"
        )
    block_length = block_length or length
    num_blocks = length // block_length
    if remasking not in masked.REMASKING:
        raise ValueError(
            f"config.sampler.parallel_remasking={remasking!r}: expected one of {masked.REMASKING}"
        )
    if not commit_rule.fixed_count:
        if remasking != "none":
            fixed = tuple(n for n, r in rules.RULES.items() if r.fixed_count)
            raise ValueError(
                f"config.sampler.parallel_remasking={remasking!r} needs a fixed-count rule {fixed}, "
                f"not {rule!r} (remasked tokens could keep an adaptive rule going forever)"
            )
        return Plan(block_length, num_blocks, block_length, block_length)
    if steps < 1 or steps % num_blocks:
        raise ValueError(
            f"config.sampler.steps={steps} must be a positive multiple of the number of blocks {num_blocks} "
            f"(sequence length {length} / block_length {block_length})"
        )
    steps_per_block = steps // num_blocks
    # Without remasking a block is done after one step per masked token at most.
    budget = steps_per_block if remasking != "none" else min(steps_per_block, block_length)
    return Plan(block_length, num_blocks, steps_per_block, budget)


def parallel_sample(
    denoise_fn: DenoiseFn,
    rng,
    x_init,
    *,
    mask_id: int,
    schedule: schedules_lib.Schedule,
    rule: str = "low_confidence",
    steps: int = 128,
    block_length: int = 0,
    threshold: float = 0.9,
    factor: float = 1.0,
    gamma: float = 0.01,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking: str = "none",
    eta: float = 0.0,
    precision: str = "float64",
    return_trajectory: bool = False,
    progress_fn: Callable[[jax.Array], None] | None = None,
    logits_provider: LogitsProvider | None = None,
) -> SampleOutput:
    """Parallel decoding with a commit rule (module doc). x_init: int32 [B, L], mask_id where to generate.

    rule: a name in ddlm.sampling.rules.RULES; threshold / factor / gamma: its options. steps: total
    steps of the fixed-count rules (a multiple of the number of blocks L / block_length). remasking:
    ReMDM strategy ('none' | 'cap' | 'rescale' | 'confidence') with strength eta, fixed-count rules only.
    logits_provider: replaces full_logits_provider (caches). progress_fn(steps_done) is called from the
    loop after every step. Returns SampleOutput; trajectory [num_blocks * budget + 1, B, L] if asked
    (rows after the last step repeat the final state).
    """
    masked._check_init(x_init, mask_id)
    commit_rule = rules.get_rule(rule)
    opts = rules.RuleOptions(threshold=threshold, factor=factor, gamma=gamma)
    rules.check_options(opts)
    x_init = x_init.astype(jnp.int32)
    length = x_init.shape[1]
    p = plan(length, rule=rule, steps=steps, block_length=block_length, remasking=remasking)
    bl = p.block_length
    greedy = temperature == 0
    provider = logits_provider or full_logits_provider(
        denoise_fn, mask_id=mask_id, schedule=schedule, block_length=bl
    )
    clamped = x_init != mask_id
    max_steps = p.num_blocks * p.budget

    def step_fn(b, carry):
        x, state, j, g, nfe, conf, traj = carry
        start = b * bl
        logits, state, calls = provider.logits(state, x, b, j)
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
        editable = x_blk == mask_id
        logp = masked.logits_to_log_probs(logits, mask_id, 1.0 if greedy else temperature, top_k, top_p)
        tok_rng, rule_rng, remask_rng = jax.random.split(jax.random.fold_in(rng, g), 3)
        if greedy:
            tokens = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        else:
            tokens = categorical.sample_categorical(tok_rng, logp, precision)
        cand = rules.Candidates(tokens, logp, editable)
        count = rules.num_transfer_tokens(jnp.sum(editable, axis=-1), p.steps_per_block - j)
        commit = commit_rule.fn(cand, count, rule_rng, opts) & editable
        new_blk = jnp.where(commit, tokens, x_blk)
        if remasking != "none":
            # The block's own linear time grid: alpha = fraction of the block decoded (LLaDA's schedule).
            a_t = j.astype(jnp.float32) / p.steps_per_block
            a_s = (j + 1).astype(jnp.float32) / p.steps_per_block
            sigma = masked.remasking_sigma(remasking, eta, a_s, a_t)
            conf_blk = jax.lax.dynamic_slice_in_dim(conf, start, bl, axis=1)
            # A row whose block is decoded is finished: frozen, as a batch of one stops there (the batch
            # keeps stepping for the rows that still have masks; remasking a finished row would make its
            # law depend on the rest of the batch).
            unfinished = jnp.any(editable, axis=-1, keepdims=True)
            decoded = ~editable & ~jax.lax.dynamic_slice_in_dim(clamped, start, bl, axis=1) & unfinished
            if remasking == "confidence":
                weights = jax.nn.softmax(jnp.where(decoded, -conf_blk, -jnp.inf), axis=-1)
                sigma_tok = jnp.where(jnp.any(decoded, axis=-1, keepdims=True), weights, 0.0) * sigma
            else:
                sigma_tok = jnp.broadcast_to(sigma, x_blk.shape)
            remask = decoded & (jax.random.uniform(remask_rng, x_blk.shape) < sigma_tok)
            new_blk = jnp.where(remask, mask_id, new_blk)
            conf_blk = jnp.where(commit, rules.confidence(cand), conf_blk)
            conf = jax.lax.dynamic_update_slice_in_dim(conf, conf_blk, start, axis=1)
        x = jax.lax.dynamic_update_slice_in_dim(x, new_blk, start, axis=1)
        if return_trajectory:
            traj = traj.at[g + 1].set(x)
        if progress_fn is not None:
            jax.debug.callback(progress_fn, g + 1)
        return x, state, j + 1, g + 1, nfe + calls, conf, traj

    def block_fn(b, carry):
        x, state, _, g, nfe, conf, traj = carry

        def cond(c):
            x_blk = jax.lax.dynamic_slice_in_dim(c[0], b * bl, bl, axis=1)
            return jnp.logical_and(c[2] < p.budget, jnp.any(x_blk == mask_id))

        return jax.lax.while_loop(cond, lambda c: step_fn(b, c), (x, state, jnp.int32(0), g, nfe, conf, traj))

    traj0 = masked.init_trajectory(max_steps + 1, x_init, return_trajectory)
    carry = (
        x_init,
        provider.init(x_init),
        jnp.int32(0),
        jnp.int32(0),
        jnp.int32(0),
        jnp.zeros(x_init.shape if remasking != "none" else (), jnp.float32),
        traj0,
    )
    x, _, _, g, nfe, _, traj = jax.lax.fori_loop(0, p.num_blocks, block_fn, carry)
    if return_trajectory:
        traj = masked.hold_final_state(traj, g)
    return SampleOutput(x, nfe, traj if return_trajectory else None)
