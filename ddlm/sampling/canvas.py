"""The DiffusionGemma-style canvas sampler for uniform-state (DUO) networks.

    canvas_sample(denoise_fn, rng, x_init, schedule=..., steps=..., canvas_length=..., ...) -> SampleOutput

denoise_fn(x [B, L], t [B, L]) -> logits [B, L, V] of a mean-parameterised network (loss 'duo': softmax(logits)
= x_theta). The sequence is generated canvas after canvas, left to right (canvas_length tokens each, dividing
L): the canvas being generated starts as uniform noise at t = 1, the committed canvases before it are clean
(t = 0) and the ones after it are noise at t = 1, each position told its own time (the network takes t
[B, L]). On a canvas, each of `steps` steps from t to s (a uniform grid 1 -> 0):

  1. logits / T(t), the temperature annealed from temperature_max at t = 1 to temperature_min at t = 0 as
     T = T_min + (T_max - T_min)(1 - (1 - t)^exponent) (gemma `AnnealingTemperatureShaper`);
  2. a proposal x_s ~ q(x_s | x_t, x_0 ~ x_theta) per position: the mean parameterisation's exact reverse step
     (`processes.UniformProcess.mean_posterior_probs`, DUO's `_posterior_from_x0`);
  3. entropy-bounded acceptance (gemma `SampleFromPredictions`): positions sorted by the entropy of x_theta,
     ascending, are accepted while the entropy summed over the ones before stays <= entropy_bound; a
     rejected position is re-noised to a uniformly random token (renoise=True, DiffusionGemma), and is told
     t = 1 from then on (it steps from there to the next s), or keeps x_t and its time (renoise=False);
     the last step (s = 0) accepts every position, so the output holds no re-noised token;
  4. early stops, per row (a row that stopped takes no more steps on this canvas: they are no-ops for it,
     and the loop ends when every row has stopped): with stop_when_stable, after stable_patience quiet steps
     (no token changed, none re-noised; gemma's early stop); with stop_entropy > 0, at the step whose mean
     (or max, stop_entropy_reduce) predictive entropy over the row's editable positions of the canvas is
     below stop_entropy: that step is made the canvas's last (s = 0, every position accepted).

Randomness is per row: row r draws with fold_in(rng, r) (or the r-th of [B] keys) folded with the canvas and
the step, so a row's tokens are those it gets alone with its key, whatever its batch and whenever the other
rows stop. SampleOutput.row_steps / row_nfe give each row's steps and the network calls it took part in.

Which networks get a KV cache. A bidirectional network (denoise_fn) re-reads the whole sequence at every
call. A block-causal network whose block_size is the canvas length (decoder=models.make_decoder of a 'bd3lm'
model; canvas c attends itself and the clean canvases < c, the x0 half of its training input) is decoded as
block.py decodes BD3-LM: the committed canvases' keys/values are written once and every call is a step on
the canvas's size tokens; the leading canvases clamped in every row (a prompt) are prefilled together
(block.py's `_prefill_prompt`); and each write is fused with the next canvas's first call (one block-causal
call on [committed canvas | next canvas as it starts]). The fusion holds for time-conditioned networks
too: unlike a masked block sampler's, the next canvas's times (1, or 0 where clamped) are known before it
starts. kv_cache=False runs the training forward on [x | x] per call (the same logits to float32 rounding,
the same tokens for the same key: tests/test_sampling_canvas.py). nfe counts the decoder calls executed.

entropy_bound = inf and renoise=False make every step the plain ancestral step of the mean parameterisation:
the exact sampler in the limit of many steps (tests/test_sampling_canvas.py measures the laws on the oracle).
Differences from gemma's sampler, by design: its step proposes x_0 itself (the denoiser's draw) and re-noises
everything else, ours proposes the reverse step x_s (to which it reduces when s = 0); no self-conditioning
(the network has no input for it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddlm import processes
from ddlm.models.decoding import Decoder
from ddlm.sampling.block import _block_causal, _prefill_prompt
from ddlm.sampling.masked import SampleOutput, init_trajectory, time_grid


def annealed_temperature(t, t_max: float, t_min: float, exponent: float):
    """T(t) = t_min + (t_max - t_min)(1 - (1 - t)^exponent): t_max at t = 1 (all noise), t_min at t = 0."""
    return t_min + (t_max - t_min) * (1.0 - (1.0 - t) ** exponent)


def entropy_bounded_accept(entropy, editable, bound: float):
    """bool [B, L]: among `editable` positions sorted by entropy [B, L] ascending, those whose predecessors'
    entropies sum to <= bound (the lowest-entropy one is always accepted; bound = inf accepts all)."""
    e = jnp.where(editable, entropy, jnp.inf)
    order = jnp.argsort(e, axis=-1)
    sorted_e = jnp.take_along_axis(e, order, axis=-1)
    before = jnp.cumsum(jnp.where(jnp.isfinite(sorted_e), sorted_e, 0.0), axis=-1) - jnp.where(
        jnp.isfinite(sorted_e), sorted_e, 0.0
    )
    ok_sorted = before <= bound
    rows = jnp.arange(e.shape[0])[:, None]
    accept = jnp.zeros_like(editable).at[rows, order].set(ok_sorted)
    return accept & editable


STOP_ENTROPY_REDUCE = ("mean", "max")


def check_canvas(length: int, canvas_length: int) -> int:
    """The canvas length to use (0 = the whole sequence); a ValueError if it does not divide the length."""
    c = canvas_length or length
    if c < 1 or length % c:
        raise ValueError(f"config.sampler.canvas_length={canvas_length} must divide the length {length}")
    return c


def check_stop_options(stable_patience: int, stop_entropy: float, stop_entropy_reduce: str) -> None:
    """One-line ValueErrors naming the config.sampler field of a bad stop option."""
    if isinstance(stable_patience, bool) or not isinstance(stable_patience, int) or stable_patience < 1:
        raise ValueError(f"config.sampler.stable_patience must be an integer >= 1, got {stable_patience!r}")
    if isinstance(stop_entropy, bool) or not isinstance(stop_entropy, (int, float)) or not stop_entropy >= 0:
        raise ValueError(f"config.sampler.stop_entropy must be a number >= 0 (nats; 0 = off), got {stop_entropy!r}")
    if stop_entropy_reduce not in STOP_ENTROPY_REDUCE:
        raise ValueError(
            f"config.sampler.stop_entropy_reduce must be one of {STOP_ENTROPY_REDUCE}, got {stop_entropy_reduce!r}"
        )


def row_keys(rng, batch: int):
    """Keys [B], one per row: rng itself if it is already [B] keys, else fold_in(rng, row). A row's draws
    come from its key only, so a row gives the same tokens alone (with its key) as in any batch."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (1 if typed else 2):
        if rng.shape[0] != batch:
            raise ValueError(f"rng: {rng.shape[0]} keys for a batch of {batch} rows")
        return rng
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(batch))


def canvas_entropy_stat(entropy, editable, reduce: str):
    """float [B]: the mean or max of entropy [B, C] over each row's editable positions (0 where none)."""
    if reduce == "max":
        return jnp.maximum(jnp.max(jnp.where(editable, entropy, -jnp.inf), axis=-1), 0.0)
    count = jnp.maximum(jnp.sum(editable, axis=-1), 1)
    return jnp.sum(jnp.where(editable, entropy, 0.0), axis=-1) / count


def check_canvas_decoder(decoder, size: int) -> None:
    """One ValueError for a network whose committed canvases cannot be cached exactly."""
    if decoder.attention != "block_causal":
        raise ValueError(
            "canvas_sample(decoder=...) caches block-causal networks (config.model.name='bd3lm' trained with "
            f"loss 'duo'); this network's attention is {decoder.attention!r}: pass denoise_fn instead"
        )
    if decoder.block_size != size:
        raise ValueError(
            f"config.sampler.canvas_length={size} must equal the block-causal network's block_size="
            f"{decoder.block_size} (config.model.block_size): a canvas is one of its blocks"
        )
    if decoder.logit_shift:
        raise ValueError("the canvas sampler does not decode logit-shifted networks (config.model.logit_shift)")


def uncached_canvas_logits(decoder, x, tau, c, size: int):
    """logits [B, size, V] of canvas c through the block-causal training forward on [xt = x | x0 = x]: canvas
    c of the noised half (its tokens x and times tau [B, L]) attends itself and the clean canvases < c."""
    t = tau if decoder.time_conditioning else None
    logits = decoder.forward(x, t, x)
    return jax.lax.dynamic_slice_in_dim(logits, c * size, size, axis=1).astype(jnp.float32)


def cached_canvas_logits(decoder, cache, x_canvas, tau_canvas, c, size: int):
    """logits [B, size, V] of canvas c (tokens x_canvas, times tau_canvas [B, size]) attending the cached
    committed canvases < c and itself; writes nothing."""
    attend = jnp.arange(cache.keys[0].shape[1]) < c * size
    t = tau_canvas if decoder.time_conditioning else None
    positions = c * size + jnp.arange(size)
    return decoder.step(cache, x_canvas, positions, attend, None, t, None)[0].astype(jnp.float32)


def write_canvas(decoder, cache, x, tau, c, size: int):
    """The fused write (block.py's): one block-causal call on [committed canvas c at t = 0 | canvas c + 1 as
    it starts, at its times tau], attending the cache. It writes canvas c's keys/values (canvas c + 1's,
    written beside them, are never attended: its own write replaces them) and returns canvas c + 1's first
    denoising logits [B, size, V] (the canvas's times are known before it starts, so this holds for a
    time-conditioned network too) and the cache. c < canvases - 1."""
    pair = jax.lax.dynamic_slice_in_dim(x, c * size, 2 * size, axis=1)
    t = None
    if decoder.time_conditioning:
        following = jax.lax.dynamic_slice_in_dim(tau, (c + 1) * size, size, axis=1)
        t = jnp.concatenate([jnp.zeros_like(following), following], axis=1)
    attend = jnp.arange(cache.keys[0].shape[1]) < c * size
    logits, cache = decoder.step(
        cache, pair, c * size + jnp.arange(2 * size), attend, _block_causal(2, size), t, c * size
    )
    return logits[:, size:].astype(jnp.float32), cache


def canvas_sample(
    denoise_fn,
    rng,
    x_init,
    *,
    schedule,
    steps: int,
    canvas_length: int = 0,
    entropy_bound: float = math.inf,
    renoise: bool = True,
    temperature_max: float = 1.0,
    temperature_min: float = 1.0,
    temperature_exponent: float = 1.0,
    stop_when_stable: bool = False,
    stable_patience: int = 1,
    stop_entropy: float = 0.0,
    stop_entropy_reduce: str = "mean",
    clamp=None,
    decoder: Decoder | None = None,
    kv_cache: bool = True,
    prefill_chunk: int = 64,
    return_trajectory: bool = False,
    progress_fn=None,
    self_conditioning: bool = False,
) -> SampleOutput:
    """Samples [B, L] tokens canvas by canvas (module docstring). x_init int [B, L]: the clamped positions
    (clamp bool [B, L]; None = none) keep their tokens, the others are drawn. rng: a key (row r draws with
    fold_in(rng, r)) or keys [B], one per row. denoise_fn(x [B, L], t [B, L]) -> logits [B, L, V] (a
    bidirectional network: every call reads the whole sequence), or None with decoder = a block-causal
    network whose block_size is the canvas length (models.make_decoder): kv_cache=True writes each committed
    canvas's keys/values once (prefill_chunk: the leading canvases clamped in every row, written together),
    False runs the training forward per call (the same logits). The trajectory holds x after the initial
    noise and after every step of every canvas ([1 + canvases * steps, B, L]). self_conditioning (denoise_fn
    only): a self-conditioned network, denoise_fn(x, t, self_cond [B, L, V]), fed softmax of the previous
    call's raw logits over the whole sequence (zeros at the first call; a canvas's first call reads the
    previous canvas's last prediction), as in training (losses.self_conditioned_apply).

    Returns SampleOutput(tokens int32 [B, L], nfe = network calls executed for the batch, trajectory,
    row_nfe int32 [B] = the calls each row took part in (its steps' calls and the cache writes), row_steps
    int32 [B] = each row's denoising steps over all canvases)."""
    if x_init.ndim != 2 or not jnp.issubdtype(x_init.dtype, jnp.integer):
        raise ValueError(f"x_init must be int [batch, length], got {x_init.dtype} {tuple(x_init.shape)}")
    if not 0.0 < temperature_min <= temperature_max:
        raise ValueError(
            f"the canvas sampler needs 0 < temperature_min <= temperature_max, got {temperature_min}, "
            f"{temperature_max}"
        )
    if entropy_bound < 0:
        raise ValueError(f"entropy_bound must be >= 0, got {entropy_bound}")
    check_stop_options(stable_patience, stop_entropy, stop_entropy_reduce)
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    batch, length = x_init.shape
    size = check_canvas(length, canvas_length)
    n_canvases = length // size
    if (decoder is None) == (denoise_fn is None):
        raise ValueError("canvas_sample needs exactly one of denoise_fn (bidirectional) and decoder (block-causal)")
    if decoder is not None:
        check_canvas_decoder(decoder, size)
        if self_conditioning:
            raise ValueError(
                "the canvas sampler's KV-cache path (a block-causal network) has no self-conditioning input: "
                "set config.model.self_conditioning=False or sample a bidirectional network"
            )
    cached = decoder is not None and kv_cache
    grid = time_grid(steps)
    clamp = jnp.zeros(x_init.shape, bool) if clamp is None else clamp
    in_canvas = jnp.arange(size)

    keys = row_keys(rng, batch)
    split = jax.vmap(jax.random.split)(keys)
    init_keys, loop_keys = split[:, 0], split[:, 1]
    # The initial noise needs the vocabulary: the network's width, from its output's shape (nothing computed).
    if decoder is not None:
        vocab = decoder.vocab_size
    else:
        vocab = jax.eval_shape(denoise_fn, x_init, jnp.ones(x_init.shape, jnp.float32)).shape[-1]
    process = processes.UniformProcess(vocab)
    noise0 = jax.vmap(lambda k: jax.random.randint(k, (length,), 0, vocab, x_init.dtype))(init_keys)
    x = jnp.where(clamp, x_init, noise0)
    tau = jnp.where(clamp, 0.0, 1.0).astype(jnp.float32)  # each position's time: known 0, noise 1
    traj = init_trajectory(1 + n_canvases * steps, x, return_trajectory)
    if return_trajectory:  # canvases that run no step (clamped everywhere) keep their state in every row
        traj = jnp.broadcast_to(x[None], traj.shape).astype(traj.dtype)
    def row_draws(fn, k, c, *args):
        """fn(key, *row_args) per row, with the row's key for (canvas c, step k): no draw depends on the batch."""
        ks = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, c), k))(loop_keys)
        return jax.vmap(fn)(ks, *args)

    def canvas_body(c, carry):
        x, tau, traj, nfe, row_nfe, row_steps, cache, pending, has_pending, sc = carry
        start = c * size
        editable = ~jax.lax.dynamic_slice_in_dim(clamp, start, size, axis=1)  # [B, size]

        def network(x, tau, x_c, tau_c, sc):
            """(this canvas's logits [B, size, V], the next self-conditioning signal)."""
            if cached:
                return cached_canvas_logits(decoder, cache, x_c, tau_c, c, size), sc
            if decoder is not None:
                return uncached_canvas_logits(decoder, x, tau, c, size), sc
            if self_conditioning:
                logits = denoise_fn(x, tau, sc).astype(jnp.float32)
                sc = jax.nn.softmax(logits, axis=-1)
            else:
                logits = denoise_fn(x, tau).astype(jnp.float32)
            return jax.lax.dynamic_slice_in_dim(logits, start, size, axis=1), sc

        def step_body(state):
            k, x, tau, traj, nfe, row_nfe, row_steps, active, stable, sc = state
            t, s = grid[k], grid[k + 1]
            x_c = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
            tau_c = jax.lax.dynamic_slice_in_dim(tau, start, size, axis=1)
            # The fused write of the previous canvas computed this canvas's first call (cache only).
            if cached:
                reuse = (k == 0) & has_pending
                logits = jax.lax.cond(reuse, lambda: pending, lambda: network(x, tau, x_c, tau_c, sc)[0])
                called = (~reuse).astype(jnp.int32)
            else:
                (logits, new_sc), called = network(x, tau, x_c, tau_c, sc), jnp.int32(1)
                # A stopped row keeps the signal of its last step: its run stays the run it has alone.
                sc = jnp.where(active[:, None, None], new_sc, sc) if self_conditioning else sc
            temp = annealed_temperature(t, temperature_max, temperature_min, temperature_exponent)
            log_x = jax.nn.log_softmax(logits / temp, axis=-1)
            x_theta = jnp.exp(log_x)
            entropy = -jnp.sum(jnp.where(x_theta > 0, x_theta * log_x, 0.0), axis=-1)  # [B, size]
            # A row ends its canvas at the last step, or at a step whose predictive entropy is below
            # stop_entropy: that step is its last (s = 0, every position accepted, no re-noised token left).
            last = jnp.broadcast_to(k == steps - 1, (batch,))
            if stop_entropy > 0:
                last = last | (canvas_entropy_stat(entropy, editable, stop_entropy_reduce) < stop_entropy)
            s_row = jnp.where(last, 0.0, s)[:, None]  # [B, 1]
            # Each editable position steps from its own time (t, or 1 if re-noised since) down to s.
            s_tok = jnp.where(editable, s_row, tau_c)
            probs = process.mean_posterior_probs(x_theta, x_c, schedule.alpha(s_tok), schedule.alpha(tau_c))
            logp = jnp.log(jnp.maximum(probs, 1e-30))
            proposal = row_draws(lambda kk, lp: jax.random.categorical(jax.random.fold_in(kk, 0), lp), k, c, logp)
            noise = row_draws(
                lambda kk: jax.random.randint(jax.random.fold_in(kk, 1), (size,), 0, vocab, x.dtype), k, c
            )
            bound = jnp.where(last, jnp.inf, entropy_bound)[:, None]
            accept = entropy_bounded_accept(entropy, editable, bound)
            renoised = editable & ~accept & renoise
            new = jnp.where(accept, proposal.astype(x.dtype), jnp.where(renoised, noise, x_c))
            # A re-noised position is pure noise again (t = 1); a rejected one kept as it was keeps its time.
            new_tau = jnp.where(accept, s_row, jnp.where(renoised, 1.0, tau_c))
            # A row that stopped is left as it is (its step is a no-op).
            new = jnp.where(active[:, None], new, x_c)
            new_tau = jnp.where(active[:, None], new_tau, tau_c)
            # A quiet step changed none of the row's tokens and re-noised none (a re-noised position drawn
            # back to its token is not converged: stopping there would output noise).
            moved = jnp.any(new != x_c, axis=-1) | jnp.any(renoised, axis=-1)
            stable = jnp.where(moved, 0, stable + 1)
            done = last
            if stop_when_stable:  # gemma's early stop, per row: patience steps without a changed token
                done = done | (stable >= stable_patience)
            x = jax.lax.dynamic_update_slice_in_dim(x, new, start, axis=1)
            tau = jax.lax.dynamic_update_slice_in_dim(tau, new_tau, start, axis=1)
            if return_trajectory:
                traj = traj.at[1 + c * steps + k].set(x)
            if progress_fn is not None:
                jax.debug.callback(progress_fn, c * steps + k + 1)
            row_nfe = row_nfe + active * called
            row_steps = row_steps + active
            return k + 1, x, tau, traj, nfe + called, row_nfe, row_steps, active & ~done, stable, sc

        def cond(state):
            k, *_, active, _, _ = state
            return (k < steps) & jnp.any(active)

        active = jnp.any(editable, axis=-1)  # a row with nothing to draw here takes no step
        stable0 = jnp.zeros((batch,), jnp.int32)
        state = (jnp.int32(0), x, tau, traj, nfe, row_nfe, row_steps, active, stable0, sc)
        k, x, tau, traj, nfe, row_nfe, row_steps, _, _, sc = jax.lax.while_loop(cond, step_body, state)
        # The canvas is committed (an early stop included).
        tau = jax.lax.dynamic_update_slice_in_dim(tau, jnp.zeros((batch, size), tau.dtype), start, axis=1)
        if return_trajectory:  # a canvas that stopped early: its remaining rows repeat its final state
            rows = 1 + c * steps + jnp.arange(steps)
            traj = traj.at[rows].set(jnp.where((jnp.arange(steps) >= k)[:, None, None], x[None], traj[rows]))
        has_pending = jnp.zeros((), bool)
        if cached:
            # The last canvas's keys are never read: skip its write.
            def write():
                logits, new_cache = write_canvas(decoder, cache, x, tau, c, size)
                return logits, new_cache, nfe + 1, row_nfe + 1, jnp.ones((), bool)

            pending, cache, nfe, row_nfe, has_pending = jax.lax.cond(
                c < n_canvases - 1, write, lambda: (pending, cache, nfe, row_nfe, has_pending)
            )
        return x, tau, traj, nfe, row_nfe, row_steps, cache, pending, has_pending, sc

    zero, zeros = jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32)
    cache, pending, first = None, jnp.zeros(()), 0
    if cached:
        chunk = max(1, prefill_chunk // size) * size
        cache = decoder.init_cache(batch, -(-length // chunk) * chunk)  # prefill writes whole chunks
        pending = jnp.zeros((batch, size, vocab), jnp.float32)
        # The leading canvases clamped in every row (a prompt), written together (block.py's prompt prefill).
        first, cache, _, zero = _prefill_prompt(decoder, x, cache, jnp.zeros(()), 0, chunk, False, known=clamp)
        zeros = zeros + zero
    sc0 = jnp.zeros((batch, length, vocab) if self_conditioning else (), jnp.float32)
    carry = (x, tau, traj, zero, zeros, jnp.zeros((batch,), jnp.int32), cache, pending, jnp.zeros((), bool), sc0)
    x, _, traj, nfe, row_nfe, row_steps, *_ = jax.lax.fori_loop(first, n_canvases, canvas_body, carry)
    return SampleOutput(x.astype(jnp.int32), nfe, traj if return_trajectory else None, row_nfe, row_steps)
