"""Reinforcement learning with verifiable rewards: a training mode of ddlm/train/trainer.py (config.rl set).

    python -m ddlm.main --config=experiments/rl_addition.py --workdir=runs/rl \\
        --config.train.init_from=runs/sft_addition

One step of the trainer's loop in this mode:

  rollouts   `RolloutIterator.__next__`: N = batch_size / group_size training prompts of the task
             (ddlm/data/tasks.py), each repeated group_size times, completed by config.sampler (any ddlm
             sampler; the recipes use 'parallel' with Fast-dLLM's dual KV cache) with the CURRENT policy
             parameters, jitted; the completions are decoded and rewarded in plain Python (outside jit);
             GRPO's group-relative advantages (ddlm.losses.group_advantages); the frozen reference's log-
             likelihood estimate of each completion, with the noise key the update will use (shared noise).
  update     the trainer's train step (ddlm/train/step.py, unchanged) with the loss of `make_loss_fn`: the
             policy's estimate (diffu-GRPO's mean-field or the NELBO estimate, config.rl.estimator) with the
             same key, then GRPO's clipped loss with a k3 KL to the reference (objective 'grpo') or wd1's
             weighted likelihood (objective 'wd1'). One update per batch of rollouts (on-policy: the ratio to
             the old policy is 1, as d1 with mu = 1).
  eval       `evaluate`: accuracy (mean exact-match reward) on config.rl.eval_problems held-out problems of
             the task's test split, with its standard error, sampled by config.sampler with the EMA
             parameters, at the trainer's eval steps.

The math is in ddlm/losses.py ("Policy optimisation with verifiable rewards"); here only the plumbing. The
iterator's position (the step) is checkpointed with the state: a resumed run draws the same prompts and keys.
With LoRA (config.lora.rank > 0) the policy is base + adapter and the reference is the base itself. Runs on
one process (one device or a mesh of the local devices).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddlm import losses, sharding
from ddlm.sharding import ConfigError

ESTIMATORS = ("nelbo", "mean_field")
OBJECTIVES = ("grpo", "wd1")


def default_config() -> ml_collections.ConfigDict:
    """config.rl: its presence selects the RL mode of the trainer."""
    c = ml_collections.ConfigDict()
    c.task = "addition"  # ddlm.data.tasks.TASKS
    c.digits = 3  # addition: digits of each operand
    c.group_size = 8  # completions per prompt (G); train.batch_size = prompts per step * G
    c.estimator = "nelbo"  # log pi(response | prompt): nelbo (VRPO-style, shared noise) | mean_field (d1)
    c.num_samples = 2  # nelbo: masks per completion (stratified mask counts)
    c.p_mask = 0.15  # mean_field: prompt positions masked at random (d1)
    c.objective = "grpo"  # grpo (clipped ratio + beta * KL) | wd1 (weighted likelihood)
    c.clip_eps = 0.2  # grpo: the ratio's clip range
    c.beta = 0.0  # weight of the k3 KL to the frozen reference (0 = no reference needed)
    c.psi = 1.0  # wd1: the weights' inverse temperature, softmax(psi * A)
    c.scale_advantages = True  # A = (r - mean) / std (GRPO) or r - mean (False)
    c.eval_problems = 512  # held-out problems per eval (accuracy and its standard error)
    c.seed = 0  # prompts, rollouts and estimator noise derive from it and the step
    return c


def enabled(config) -> bool:
    return "rl" in config


def validate(config) -> None:
    """One-line ConfigErrors for config.rl and what the mode needs from the rest of the config."""
    if not enabled(config):
        return
    from ddlm.data import sft, tasks
    from ddlm.train.checks import is_int
    from ddlm.train.checks import require as req

    c, t = config.rl, config.train

    def is_num(x):  # a real number (not a bool, not a numeric string), finite
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    req(c.task in tasks.TASKS, "rl.task", f"one of {tasks.TASKS}", c.task)
    req(is_int(c.digits) and 1 <= c.digits <= 9, "rl.digits", "an integer in [1, 9]", c.digits)
    req(is_int(c.group_size) and c.group_size >= 2, "rl.group_size", "an integer >= 2 (advantages are relative to the group)", c.group_size)
    req(c.estimator in ESTIMATORS, "rl.estimator", f"one of {ESTIMATORS}", c.estimator)
    req(c.objective in OBJECTIVES, "rl.objective", f"one of {OBJECTIVES}", c.objective)
    req(is_int(c.num_samples) and c.num_samples >= 1, "rl.num_samples", "an integer >= 1", c.num_samples)
    req(is_num(c.p_mask) and 0 <= c.p_mask < 1, "rl.p_mask", "in [0, 1)", c.p_mask)
    req(is_num(c.clip_eps) and 0 < c.clip_eps < 1, "rl.clip_eps", "in (0, 1)", c.clip_eps)
    req(is_num(c.beta) and c.beta >= 0, "rl.beta", "a finite number >= 0 (0 = no KL term)", c.beta)
    req(is_num(c.psi) and c.psi > 0, "rl.psi", "a finite number > 0", c.psi)
    req(isinstance(c.scale_advantages, bool), "rl.scale_advantages", "True or False", c.scale_advantages)
    req(is_int(c.eval_problems) and c.eval_problems >= 1, "rl.eval_problems", "an integer >= 1", c.eval_problems)
    req(is_int(c.seed) and 0 <= c.seed < 2**32, "rl.seed", "an integer in [0, 2^32)", c.seed)
    if t.batch_size % c.group_size:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} must be a multiple of config.rl.group_size={c.group_size} "
            "(each step completes batch_size / group_size prompts group_size times)"
        )
    if config.optim.grad_accum_steps != 1:
        raise ConfigError(
            "config.optim.grad_accum_steps must be 1 in the RL mode (the estimators draw one noise key per "
            f"batch), got {config.optim.grad_accum_steps}"
        )
    if not sft.is_sft(config.data) or config.diffusion.loss != "sft":
        raise ConfigError(
            "the RL mode (config.rl) fine-tunes an SFT model: config.diffusion.loss must be 'sft' with "
            "config.data.sft_data set (its rows' layout: prompt, then response and eos padding), got "
            f"loss={config.diffusion.loss!r}"
        )
    if not t.init_from:
        raise ConfigError(
            "config.train.init_from must name the SFT run to start from (and the frozen reference) in the RL "
            "mode, got ''"
        )
    if config.model.time_conditioning:
        raise ConfigError(
            "config.model.time_conditioning must be False in the RL mode (a time-free network, as LLaDA's "
            "and d1's: the estimators' inputs are not draws of the forward process at a time t), got True"
        )
    task = task_of(config)
    prompt_len = 1 + task.max_prompt_chars  # bos + the longest prompt (the char tokenizer: a token a char)
    if t.seq_len < prompt_len + task.max_answer_chars + 1:
        raise ConfigError(
            f"config.train.seq_len={t.seq_len} leaves no room for the answer: the task takes up to "
            f"{prompt_len} prompt tokens and {task.max_answer_chars} answer tokens plus eos"
        )
    from ddlm.train import lora

    if lora.enabled(config) and config.lora.quantize != "none" and config.sampler.cache != "none":
        raise ConfigError(
            f"config.sampler.cache={config.sampler.cache!r} decodes merged weights, which a quantized base "
            "(config.lora.quantize) does not have: use config.sampler.cache='none' for RL with QLoRA"
        )


def task_of(config):
    from ddlm.data import tasks

    return tasks.get_task(config.rl.task, digits=config.rl.digits)


# ------------------------------------------------------------------------------------------------ the loss


def _apply_fn(model, params, *, train: bool, dropout_rng=None):
    """apply(xt, t, ctx) -> float32 logits of a time-free network with `params` (the estimators' form)."""

    def apply(xt, t, ctx):
        del t, ctx  # time-free (validate)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        return model.apply({"params": params}, xt, None, x0=None, train=train, rngs=rngs).astype(jnp.float32)

    return apply


def log_prob_units(apply_fn, tokens, response_mask, noise, rl_config, mask_id: int):
    """(log-likelihood units [B, U], unit_mask [B, U]) of the completions under apply_fn with the noise key
    `noise`: per response token for 'mean_field' (U = L), one per sequence for 'nelbo' (U = 1)."""
    if rl_config.estimator == "mean_field":
        per_token, _ = losses.mean_field_log_prob(
            apply_fn, tokens, response_mask, noise, mask_id=mask_id, p_mask=float(rl_config.p_mask)
        )
        return per_token, (response_mask > 0).astype(jnp.float32)
    _, seq = losses.nelbo_log_prob(
        apply_fn, tokens, response_mask, noise, mask_id=mask_id, num_samples=int(rl_config.num_samples)
    )
    return seq[:, None], jnp.ones((tokens.shape[0], 1), jnp.float32)


def make_loss_fn(model, config, *, mask_id: int):
    """loss_fn(params, batch, rng, train, step=None) -> (loss, metrics) of the RL mode, for the trainer's
    train step. batch: tokens, loss_mask (the response), advantages [B], reward [B], ref_logp [B, U] and
    noise (the key data shared with the reference's estimate)."""
    rc = config.rl

    def loss_fn(params, batch, rng, train, step=None):
        del step
        apply = _apply_fn(model, params, train=train, dropout_rng=rng)
        noise = jax.random.wrap_key_data(batch["noise"])
        logp, unit_mask = log_prob_units(apply, batch["tokens"], batch["loss_mask"], noise, rc, mask_id)
        ref = batch["ref_logp"]
        if rc.objective == "grpo":
            loss, metrics = losses.grpo_loss(
                logp,
                jax.lax.stop_gradient(logp),
                batch["advantages"],
                unit_mask,
                clip_eps=float(rc.clip_eps),
                beta=float(rc.beta),
                ref_logp=ref,
            )
        else:
            seq = jnp.sum(logp * unit_mask, axis=1)
            loss = losses.weighted_likelihood_loss(seq, batch["advantages"], int(rc.group_size), psi=float(rc.psi))
            kl = jnp.sum(losses.k3_kl(logp, ref) * unit_mask) / jnp.maximum(jnp.sum(unit_mask), 1.0)
            if rc.beta:
                loss = loss + float(rc.beta) * kl
            metrics = {"kl": kl if rc.beta else jnp.zeros(())}
        metrics["reward"] = jnp.mean(batch["reward"])
        metrics["log_prob"] = jnp.mean(jnp.sum(logp * unit_mask, axis=1))
        return loss, metrics

    return loss_fn


def rows_sharding(batch_sharding, ndim: int):
    """The batch sharding (rows over the data axes) for an array of rank `ndim`."""
    return jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0], *([None] * (ndim - 1)))
    )


def batch_abstract(config, batch_sharding, replicated) -> dict:
    """ShapeDtypeStructs (with shardings) of an RL batch: what the trainer compiles its step for."""
    b, n = config.train.batch_size, config.train.seq_len
    units = n if config.rl.estimator == "mean_field" else 1
    s = jax.ShapeDtypeStruct
    rows = lambda shape, dtype: s(shape, dtype, sharding=rows_sharding(batch_sharding, len(shape)))
    return {
        "tokens": rows((b, n), jnp.int32),
        "loss_mask": rows((b, n), jnp.float32),
        "advantages": rows((b,), jnp.float32),
        "reward": rows((b,), jnp.float32),
        "ref_logp": rows((b, units), jnp.float32),
        "noise": s((2,), jnp.uint32, sharding=replicated),
    }


# ------------------------------------------------------------------------------------------------ rollouts


class Policy:
    """The jitted pieces the rollouts and the eval need, built once from the trainer's Setup:

    sample(params, rng, x_init) -> tokens     config.sampler with the policy (LoRA: the merged weights)
    reference_units(tokens, mask, noise)       the frozen reference's estimate (log_prob_units)
    """

    def __init__(self, setup, reference_params):
        from ddlm import models
        from ddlm.sampling import cli as sampling_cli
        from ddlm.sampling import config as sampler_config
        from ddlm.train import lora

        config = setup.config
        self.setup, self.config, self.tok = setup, config, setup.tokenizer
        sc = sampler_config.validate(config.sampler, diffusion=config.diffusion, seq_len=config.train.seq_len)
        self.sampler_config = sc
        self.lora = lora.enabled(config)
        frozen = setup.frozen
        if self.lora and config.lora.quantize == "none":
            # Merged weights on the plain network: every sampler, KV caches included, runs as without LoRA.
            base_model = models.get_model(config.model, self.tok.vocab_size)
            sample = sampling_cli.sample_fn(config, sc, base_model, self.tok, None)
            to_params = lambda p, fz: lora.merge(fz, p, config.lora)
        else:
            sample = sampling_cli.sample_fn(config, sc, setup.model, self.tok, None)
            to_params = (lambda p, fz: lora.combine(fz, p)) if self.lora else (lambda p, fz: p)

        def rollout(params, frozen, rng, x_init):
            return sample(to_params(params, frozen), rng, x_init, None).tokens

        self._rollout = jax.jit(rollout)
        self._frozen = frozen
        rc, mask_id, model = config.rl, self.tok.mask_id, setup.model

        def reference(params, tokens, response_mask, noise):
            apply = _apply_fn(model, params, train=False)
            return log_prob_units(apply, tokens, response_mask, jax.random.wrap_key_data(noise), rc, mask_id)[0]

        self._reference = jax.jit(reference)
        self.reference_params = reference_params

    def sample(self, params, rng, x_init):
        with self.setup.context():
            return self._rollout(params, self._frozen, rng, x_init)

    def reference_units(self, tokens, response_mask, noise):
        with self.setup.context():
            return self._reference(self.reference_params, tokens, response_mask, noise)


def reference_params(setup, init_params_fn):
    """The frozen reference's full parameters: the base (LoRA: setup.frozen with zero adapters and its own
    train_also parameters) or the parameters the run started from (init_params_fn(), config.train.init_from;
    not called with LoRA, whose state holds only the trainable part)."""
    from ddlm.train import lora

    if lora.enabled(setup.config):
        base = lora.seed_trainable(setup.init_state().params, setup.frozen, zero_adapters=True)
        return lora.combine(setup.frozen, base)
    return init_params_fn()


def encode_prompts(tok, problems, seq_len: int, repeat: int) -> tuple[np.ndarray, np.ndarray]:
    """(x_init int32 [n * repeat, seq_len], response_mask float32 [same]): bos + the prompt, masks after it
    (the SFT rows' layout, template 'none'); each problem's row repeated `repeat` times in a row."""
    rows, masks = [], []
    for p in problems:
        ids = [tok.bos_id] + tok.encode(p.prompt)
        row = np.full([seq_len], tok.mask_id, np.int32)
        row[: len(ids)] = ids
        m = np.zeros([seq_len], np.float32)
        m[len(ids) :] = 1.0
        rows += [row] * repeat
        masks += [m] * repeat
    return np.stack(rows), np.stack(masks)


def completions(tok, tokens: np.ndarray, response_mask: np.ndarray) -> list[str]:
    """The decoded response of each row, up to its first eos."""
    out = []
    for row, m in zip(np.asarray(tokens), np.asarray(response_mask)):
        resp = row[m > 0]
        eos = np.flatnonzero(resp == tok.eos_id)
        out.append(tok.decode(resp[: eos[0]] if len(eos) else resp))
    return out


class RolloutIterator:
    """The trainer's batch iterator in the RL mode: each `next` is one batch of rewarded rollouts of the
    current policy (get_state() -> the trainer's TrainState). Its state, the step, is checkpointed."""

    def __init__(self, setup, get_state, init_params_fn):
        self.setup, self.config = setup, setup.config
        self.get_train_state = get_state
        self.init_params_fn = init_params_fn  # () -> the parameters the run started from (the reference)
        self.task = task_of(self.config)
        self.step = 0
        self._policy = None
        self.timings: collections.deque = collections.deque(maxlen=10_000)  # per step: rollout_s, reference_s

    @property
    def policy(self) -> Policy:
        if self._policy is None:  # after the restore: the reference is what the run started from
            ref = reference_params(self.setup, self.init_params_fn) if self.config.rl.beta else None
            self._policy = Policy(self.setup, ref)
        return self._policy

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def window_timings(self, n: int) -> dict[str, float]:
        """Mean seconds of the last n steps' rollouts and reference estimates (the trainer logs them beside
        steps_per_s, whose time includes them)."""
        last = list(self.timings)[-n:] if n > 0 else []
        if not last:
            return {}
        return {k: float(np.mean([t[k] for t in last])) for k in ("rollout_s", "reference_s")}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from ddlm.data import tasks

        cfg, rc, tok = self.config, self.config.rl, self.setup.tokenizer
        g = rc.group_size
        n = cfg.train.batch_size // g
        problems = tasks.problems(self.task, "train", n, seed=(rc.seed * 1_000_003 + self.step) % 2**32)
        x_init, response_mask = encode_prompts(tok, problems, cfg.train.seq_len, g)
        key = jax.random.fold_in(jax.random.key(rc.seed), self.step)
        sample_key, noise_key = jax.random.split(key)
        state = self.get_train_state()
        policy = self.policy
        t0 = time.perf_counter()
        tokens = np.asarray(jax.device_get(policy.sample(state.params, sample_key, jnp.asarray(x_init))))
        t_rollout = time.perf_counter() - t0
        texts = completions(tok, tokens, response_mask)
        rewards = np.array([self.task.reward(p, s) for p, s in zip(np.repeat(problems, g), texts)], np.float32)
        advantages = np.asarray(losses.group_advantages(jnp.asarray(rewards), g, scale=bool(rc.scale_advantages)))
        noise = np.asarray(jax.random.key_data(noise_key))
        units = cfg.train.seq_len if rc.estimator == "mean_field" else 1
        t_reference = 0.0  # no reference without a KL term
        if rc.beta:
            t1 = time.perf_counter()
            ref = np.asarray(jax.device_get(policy.reference_units(tokens, response_mask, noise)))
            t_reference = time.perf_counter() - t1
        else:
            ref = np.zeros((len(tokens), units), np.float32)
        self.timings.append(
            {"step": self.step, "rollout_s": t_rollout, "reference_s": t_reference, "reward": float(rewards.mean())}
        )
        self.step += 1
        bs = self.setup.batch_sharding
        rep = sharding.replicated(self.setup.mesh)
        put = lambda x, s=None: jax.device_put(x, s or rows_sharding(bs, x.ndim))
        return {
            "tokens": put(tokens.astype(np.int32)),
            "loss_mask": put(response_mask),
            "advantages": put(advantages.astype(np.float32)),
            "reward": put(rewards),
            "ref_logp": put(ref.astype(np.float32)),
            "noise": put(noise, rep),
        }


# ------------------------------------------------------------------------------------------------ eval


def evaluate(setup, policy: Policy, params, *, batch_size: int | None = None) -> dict:
    """Held-out accuracy of `params` (see `evaluate_rewards`): 'accuracy' (mean exact-match reward),
    'accuracy_se' (binomial standard error sqrt(p (1 - p) / n)), 'format' (completions that are a plain
    number) and 'problems'."""
    rewards, formats = evaluate_rewards(setup, policy, params, batch_size=batch_size)
    p, n = float(np.mean(rewards)), len(rewards)
    return {
        "accuracy": p,
        "accuracy_se": math.sqrt(max(p * (1 - p), 0.0) / n),
        "format": float(np.mean(formats)),
        "problems": n,
    }


def evaluate_rewards(setup, policy: Policy, params, *, batch_size: int | None = None):
    """(rewards [n], well-formed [n]) of `params` (the policy's trainable part: full parameters, or the
    adapter) on config.rl.eval_problems problems of the task's test split (the same ones every time, so two
    checkpoints can be compared problem by problem), completed by config.sampler with a fixed key, in
    batches of train.batch_size rows."""
    from ddlm.data import tasks

    cfg, rc, tok = setup.config, setup.config.rl, setup.tokenizer
    task = task_of(cfg)
    problems = tasks.problems(task, "test", rc.eval_problems, seed=rc.seed + 1)
    batch = batch_size or cfg.train.batch_size
    rewards, formats = [], []
    for lo in range(0, len(problems), batch):
        chunk = problems[lo : lo + batch]
        x_init, response_mask = encode_prompts(tok, chunk, cfg.train.seq_len, 1)
        pad = batch - len(chunk)  # the last chunk is padded to the compiled batch
        if pad:
            x_init = np.concatenate([x_init, np.repeat(x_init[-1:], pad, axis=0)])
        key = jax.random.fold_in(jax.random.key(rc.seed + 1), lo)
        tokens = np.asarray(jax.device_get(policy.sample(params, key, jnp.asarray(x_init))))[: len(chunk)]
        texts = completions(tok, tokens, response_mask)
        rewards += [task.reward(p, s) for p, s in zip(chunk, texts)]
        formats += [float(task.format_ok(s)) for s in texts]
    return np.asarray(rewards, np.float64), np.asarray(formats, np.float64)


def eval_line(step: int, metrics: dict, seconds: float) -> str:
    return (
        f"eval at step {step} (EMA params, {metrics['problems']} held-out problems): accuracy "
        f"{metrics['accuracy']:.4f} ± {metrics['accuracy_se']:.4f}, well-formed {metrics['format']:.3f} "
        f"({seconds:.1f}s)"
    )
