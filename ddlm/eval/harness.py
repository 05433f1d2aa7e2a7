"""lm-evaluation-harness backend `ddlm`: any ddlm workdir (trained, adapted or imported) under lm-eval's tasks.

    python -m ddlm.eval.harness --model ddlm --model_args workdir=runs/quickstart,num_samples=128 \\
        --tasks ddlm_local_mc,ddlm_local_gen --include_path tests/data/lm_eval
    lm_eval --model ddlm --model_args workdir=runs/quickstart_ar,sampler=ar:greedy=true --tasks ...

`python -m ddlm.eval.harness` is lm-eval's own command line with this module imported first (lm-eval 0.4.13
has no plugin discovery; its successors read the `lm_eval.models` entry point that setup.cfg declares, so
plain `lm_eval --model ddlm` works there once ddlm is installed). The workdir's newest checkpoint is loaded
with `ddlm.loading.load_for_inference` (EMA parameters unless ema=false).

What each request type computes (nats; a text is framed as the training data frames a document: bos first, or
the SFT template's prompt for an SFT model):

    loglikelihood          AR (causal network): the exact sum of log p(continuation tokens | context), and
                           is_greedy = every continuation token is the argmax.
                           Masked diffusion ('mdlm', 'd3pm', 'radd' networks: x0 logits on the absorbing
                           graph): LLaDA's Monte-Carlo estimate of log p(continuation | context) with
                           `num_samples` draws (ddlm.eval.conditional.make_estimator, stratified, in batches of
                           `mc_batch_size`) on a row of the network's window whose tail past the continuation
                           stays masked (`window_row`), its standard error logged per call and kept in
                           `self.estimates`;
                           every continuation of one context uses the same key (common random numbers, as
                           conditional.multiple_choice does). is_greedy: greedy decoding of the continuation's
                           length (the 'parallel' sampler, low_confidence rule, one token per step, LLaDA's
                           check) reproduces it.
    loglikelihood_rolling  AR: the exact log-likelihood over lm-eval's rolling windows of train.seq_len.
                           Diffusion: minus the NELBO (ddlm.eval.likelihood.nelbo_per_sequence, `time_samples`
                           Monte-Carlo times, boundary terms included), a lower bound, over disjoint windows
                           of train.seq_len tokens each scored on its own; the delta-method standard error over
                           documents is logged.
    generate_until         any ddlm sampler (`sampler` spec, as the frontier's: name[:field=value...] of
                           config.sampler fields, steps / temperature / precision included; '' = the
                           checkpoint's config.sampler) on a canvas of the network's window: [context, then
                           masks to the end] (AR: masks for max_gen_toks, the rest padding), batch_size rows at
                           a time. The text is the first max_gen_toks generated tokens, cut at eos and at the
                           first stop sequence (gen_kwargs['until']). Other gen_kwargs are ignored: the
                           sampler spec decides how to sample.

Keys: a request's randomness is fold_in(key(seed), crc32 of its context text) (`request_key`), so a score does
not depend on which other requests share its batch; generation batch b uses fold_in(key(seed), b).
Inputs longer than the network's window keep their last tokens (the context is cut on the left).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ddlm import loading, losses, schedules
from ddlm.data import sft
from ddlm.eval import conditional, likelihood

# A child of lm-eval's logger: the standard errors are printed beside lm-eval's own lines.
log = logging.getLogger("lm_eval.ddlm")
# Losses whose network outputs x0 logits on the absorbing graph: the conditional estimator applies.
X0_LOSSES = ("mdlm", "d3pm", "radd")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def request_key(seed: int, text: str):
    """The key of a request: fold_in(key(seed), crc32(text)) (a stable hash, unlike Python's hash())."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF)


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in _TRUE + _FALSE:
        return str(value).lower() in _TRUE
    raise ValueError(f"--model_args {name}={value!r}: expected true or false")


def _as_int(name: str, value, low: int) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--model_args {name}={value!r}: expected an integer >= {low}") from None
    if out != float(value) or out < low:
        raise ValueError(f"--model_args {name}={value!r}: expected an integer >= {low}")
    return out


def sampler_config(base_sampler, spec: str):
    """config.sampler for a spec 'name[:field=value...]' ('' = base_sampler as it is): the frontier's spec
    (ddlm.eval.frontier.parse_sampler_spec) plus the fields it sweeps itself, steps, temperature and
    precision. A bad spec is a ValueError naming it."""
    from ddlm.eval import frontier
    from ddlm.sampling import config as sampling_config

    sc = sampling_config.resolve(base_sampler)
    if not spec:
        return sc
    own = {"steps": int, "temperature": float, "precision": str}
    name, *items = spec.strip().split(":")
    rest = [name]
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in own:
            try:
                values[key] = own[key](value)
            except ValueError:
                raise ValueError(f"sampler={spec!r}: {key}={value!r} is not a {own[key].__name__}") from None
        else:
            rest.append(item)
    try:
        name, fields = frontier.parse_sampler_spec(":".join(rest))
    except ValueError as e:
        raise ValueError(f"sampler={spec!r}: {str(e).removeprefix('--samplers: ')}") from None
    with sc.unlocked():
        sc.name = name
        for key, value in {**fields, **values}.items():
            sc[key] = value
    return sc


@dataclasses.dataclass(frozen=True)
class Encoded:
    context: list[int]  # framed context ids (bos / SFT prompt first)
    continuation: list[int]


class DDLMLM(LM):
    """lm-eval's LM over a ddlm workdir (module doc). model_args: workdir (required), sampler (a spec, '' =
    the checkpoint's), num_samples (Monte-Carlo draws per diffusion loglikelihood, a multiple of
    mc_batch_size), mc_batch_size, time_samples (diffusion rolling), max_gen_toks (default when a task
    gives none), seed, ema, greedy_check (diffusion is_greedy by greedy decoding; false: is_greedy=False)."""

    def __init__(
        self,
        workdir: str = "",
        sampler: str = "",
        num_samples=128,
        mc_batch_size=16,
        time_samples=16,
        max_gen_toks=32,
        seed=0,
        ema=True,
        greedy_check=True,
        batch_size=8,
        max_batch_size=None,
        device=None,
        loaded: loading.Loaded | None = None,
        **unknown,
    ):
        super().__init__()
        del max_batch_size, device  # lm-eval's; jax places the work on its devices
        if unknown:
            raise ValueError(
                f"--model_args {', '.join(sorted(unknown))}: not a ddlm model argument; expected workdir, sampler, "
                "num_samples, mc_batch_size, time_samples, max_gen_toks, seed, ema, greedy_check"
            )
        if not workdir and loaded is None:
            raise ValueError("--model_args workdir=... is required (a ddlm workdir with a checkpoint)")
        self.num_samples = _as_int("num_samples", num_samples, 1)
        self.mc_batch_size = _as_int("mc_batch_size", mc_batch_size, 1)
        if self.num_samples % self.mc_batch_size or self.num_samples // self.mc_batch_size < 2:
            raise ValueError(
                f"--model_args num_samples={self.num_samples} must be a multiple of mc_batch_size="
                f"{self.mc_batch_size}, at least twice it (the standard error comes from batch means)"
            )
        self.time_samples = _as_int("time_samples", time_samples, 1)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 1)
        self.seed = _as_int("seed", seed, 0)
        self.greedy_check = _as_bool("greedy_check", greedy_check)
        self.batch = 8 if str(batch_size).startswith("auto") else _as_int("batch_size", batch_size, 1)
        self.loaded = loaded or loading.load_for_inference(workdir, ema=_as_bool("ema", ema))
        config = self.loaded.config
        self.config, self.tok, self.loss = config, self.loaded.tokenizer, config.diffusion.loss
        self.seq_len = int(config.train.seq_len)
        self.sampler = sampler_config(config.sampler, sampler)
        self.schedule = schedules.get_schedule(config.diffusion.schedule, **dict(config.diffusion.schedule_kwargs))
        self.time_free = self.loss == "radd"
        self.estimates: list[conditional.LikelihoodEstimate] = []  # of the last diffusion loglikelihood call
        model, params = self.loaded.model, self.loaded.params

        def logits_fn(tokens, t=None):
            t = None if self.time_free else t
            return model.apply({"params": params}, tokens, t, x0=None, train=False).astype(jnp.float32)

        self._logits = logits_fn
        self._ar_scores = jax.jit(self._ar_token_scores)
        self._estimator = None
        self._samplers = {}

    # ------------------------------------------------------------------------------------ framing

    @property
    def is_ar(self) -> bool:
        return self.loss == "ar"

    def prefix(self, context: str) -> list[int]:
        """The framed ids of a context: [bos] + ids, or an SFT model's templated prompt."""
        if sft.is_sft(self.config.data):
            return sft.encode_prompt(self.tok, context, self.config.data.sft_template)
        return [self.tok.bos_id] + self.tok.encode(context)

    def encode_pair(self, context: str, continuation: str) -> Encoded:
        """lm-eval's split (HFLM._encode_pair): trailing spaces of the context go to the continuation, and the
        continuation's ids are those of the whole text past the context's, so a tokenizer that merges across
        the boundary scores what it would have produced."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.prefix(context + continuation)
        ctx = self.prefix(context)
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary
            return Encoded(ctx, self.tok.encode(continuation))
        return Encoded(ctx, whole[len(ctx) :])

    def _fit(self, enc: Encoded) -> Encoded:
        """The context cut on the left so that context + continuation fit the window (at least one context
        token stays: a first token has nothing to be predicted from)."""
        if not enc.continuation:
            raise ValueError("a loglikelihood request has an empty continuation: nothing to score")
        if len(enc.continuation) >= self.seq_len:
            raise ValueError(
                f"a continuation of {len(enc.continuation)} tokens does not fit the network's window of "
                f"{self.seq_len} (config.train.seq_len) with its context"
            )
        keep = self.seq_len - len(enc.continuation)
        return Encoded(enc.context[-keep:], enc.continuation)

    # ------------------------------------------------------------------------------------ AR scoring

    def _ar_token_scores(self, tokens):
        """tokens int [B, L] -> (log p(tokens[:, i] | tokens[:, <i]) [B, L - 1], argmax hit bool [B, L - 1])."""
        logits = self._logits(tokens)[:, :-1].at[..., self.tok.mask_id].set(losses.NEG_INF)  # never predicted
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = tokens[:, 1:]
        lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return lp, jnp.argmax(logp, axis=-1) == target

    def score_tokens(self, pairs: Sequence[Encoded]) -> list[tuple[float, bool]]:
        """AR: (sum of log p(continuation | context), all argmax) of each pair, batch_size rows of the window."""
        out = []
        pad = self.tok.pad_id
        for lo in range(0, len(pairs), self.batch):
            chunk = [self._fit(p) for p in pairs[lo : lo + self.batch]]
            tokens = np.full((self.batch, self.seq_len), pad, np.int32)
            for i, p in enumerate(chunk):
                row = p.context + p.continuation
                tokens[i, : len(row)] = row
            with self.loaded.context():
                lp, hit = jax.device_get(self._ar_scores(tokens))
            for i, p in enumerate(chunk):
                end = len(p.context) + len(p.continuation)
                span = slice(len(p.context) - 1, end - 1)  # position i - 1 predicts token i
                out.append((float(np.sum(lp[i, span], dtype=np.float64)), bool(np.all(hit[i, span]))))
        return out

    # ------------------------------------------------------------------------------------ diffusion scoring

    def _check_x0_network(self, what: str):
        if self.loss not in X0_LOSSES:
            raise ValueError(
                f"{what} of a {self.loss!r} network: the conditional estimator needs x0 logits on the absorbing "
                f"graph ({', '.join(X0_LOSSES)}); 'ar' networks are scored exactly"
            )

    def estimator(self):
        """conditional.make_estimator over the network (built once). The network's time is that of the row's
        masked fraction (parallel.sequence_time, as the samplers give it), the masked tail included."""
        from ddlm.sampling import parallel

        if self._estimator is None:
            self._check_x0_network("loglikelihood")
            mask_id = self.tok.mask_id
            denoise = lambda xt, t: self._logits(xt, parallel.sequence_time(xt, mask_id, self.schedule))
            self._estimator = conditional.make_estimator(
                denoise, mask_id=mask_id, batch_size=self.mc_batch_size, schedule=self.schedule
            )
        return self._estimator

    def window_row(self, enc: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_len], response_mask [seq_len]): context, continuation, then masks to the end of the
        window. The masked tail is the text that would follow, never revealed (the canvas generate_until
        samples on): a masked diffusion model marginalises it, so the bound is on log p(continuation |
        context) all the same, and every row has one shape (one compilation, where LLaDA's unpadded rows
        compile once per length)."""
        enc = self._fit(enc)
        tokens, response = conditional.choice_row(enc.context, enc.continuation)
        tail = self.seq_len - len(tokens)
        tokens = np.concatenate([tokens, np.full(tail, self.tok.mask_id, np.int32)])
        return tokens, np.concatenate([response, np.zeros(tail, bool)])

    def estimate(self, context: str, enc: Encoded) -> conditional.LikelihoodEstimate:
        """The Monte-Carlo estimate of log p(continuation | context) with the context's key."""
        tokens, response = self.window_row(enc)
        with self.loaded.context():
            return self.estimator()(
                request_key(self.seed, context), tokens, response, num_samples=self.num_samples
            )

    def greedy_continuation(self, enc: Encoded) -> list[int]:
        """Greedy decoding of len(continuation) tokens after the context: the 'parallel' sampler, rule
        low_confidence, temperature 0, one token per step (LLaDA's is_greedy check)."""
        enc = self._fit(enc)
        n = len(enc.continuation)
        sc = sampler_config(self.config.sampler, f"parallel:rule=low_confidence:steps={n}:temperature=0")
        with sc.unlocked():
            sc.block_length, sc.cache = 0, "none"
        x = np.asarray([enc.context + [self.tok.mask_id] * n], np.int32)
        out = self._run_sampler(sc, jax.random.key(0), x)
        return out[0, len(enc.context) :].tolist()

    # ------------------------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.loglikelihood_pairs([r.args for r in requests])

    def loglikelihood_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """[(context, continuation)] -> [(log-likelihood, is_greedy)] (module doc)."""
        return self.loglikelihood_encoded([c for c, _ in pairs], [self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_encoded(self, contexts: Sequence[str], encoded: Sequence[Encoded]):
        """loglikelihood_pairs on token ids; contexts: the texts whose crc32 keys the Monte-Carlo draws."""
        if self.is_ar:
            return self.score_tokens(encoded)
        self.estimates = [self.estimate(c, e) for c, e in zip(contexts, encoded)]
        greedy = [
            self.greedy_check and self.greedy_continuation(e) == self._fit(e).continuation for e in encoded
        ]
        ses = np.array([e.se for e in self.estimates])
        log.info(
            "ddlm loglikelihood: %d requests, %d Monte-Carlo draws each; standard error mean %.4f, max %.4f nats",
            len(encoded),
            self.num_samples,
            float(np.mean(ses)) if len(ses) else float("nan"),
            float(np.max(ses)) if len(ses) else float("nan"),
        )
        return [(e.mean, g) for e, g in zip(self.estimates, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.rolling_texts([r.args[0] for r in requests])

    def rolling_texts(self, texts: Sequence[str]) -> list[float]:
        """The log-likelihood of each text (AR: exact; diffusion: minus the NELBO bound; module doc)."""
        if self.is_ar:
            from lm_eval import utils as lm_utils

            out = []
            for text in texts:
                ids = self.tok.encode(text)
                windows = lm_utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.tok.bos_id, max_seq_len=self.seq_len, context_len=1
                )
                pairs = [Encoded(*map(list, lm_utils.make_disjoint_window(w))) for w in windows]
                out.append(sum(score for score, _ in self.score_tokens(pairs)))
            return out
        nats, counts = [], []
        for text in texts:
            value, count = self.nelbo(text)
            nats.append(value)
            counts.append(count)
        s = likelihood.ratio_summary(nats, counts)
        log.info(
            "ddlm loglikelihood_rolling: %d texts, NELBO %.4f +- %.4f nats/token (%d Monte-Carlo times each)",
            len(texts),
            s["mean"],
            s["se"],
            self.time_samples,
        )
        return [-v for v in nats]

    def nelbo(self, text: str) -> tuple[float, int]:
        """(NELBO in nats, scored tokens) of a text: [prefix] + ids in disjoint windows of seq_len, the prefix
        not scored; the text's key, window w with fold_in(key, w)."""
        row = [self.tok.bos_id] + self.tok.encode(text)
        skip = 1
        key = request_key(self.seed, text)
        total, count = 0.0, 0
        for w, lo in enumerate(range(0, len(row), self.seq_len)):
            x0 = np.asarray([row[lo : lo + self.seq_len]], np.int32)
            mask = np.ones(x0.shape, np.float32)
            mask[0, : max(0, skip - lo)] = 0.0
            if not mask.any():
                continue
            est = self._nelbo_fn(x0, mask, jax.random.fold_in(key, w))
            total += float(est.nats[0])
            count += int(est.tokens[0])
        return total, count

    def _nelbo_fn(self, x0, mask, key):
        if not hasattr(self, "_nelbo_jit"):
            block = int(self.config.model.block_size) if self.loss == "bd3lm" else None
            num_steps = int(self.config.diffusion.num_steps) or None
            model, params = self.loaded.model, self.loaded.params

            def apply_fn(xt, t, x0_context):
                t = None if self.time_free else t
                return model.apply({"params": params}, xt, t, x0=x0_context, train=False).astype(jnp.float32)

            self._nelbo_jit = jax.jit(
                lambda x, m, k: likelihood.nelbo_per_sequence(
                    self.loss,
                    apply_fn,
                    x,
                    m,
                    k,
                    schedule=self.schedule,
                    vocab_size=self.tok.vocab_size,
                    mask_id=self.tok.mask_id,
                    block_size=block,
                    num_steps=num_steps,
                    time_samples=self.time_samples,
                )
            )
        with self.loaded.context():
            return jax.device_get(self._nelbo_jit(x0, mask, key))

    # ------------------------------------------------------------------------------------ generation

    def _run_sampler(self, sc, rng, x_init: np.ndarray) -> np.ndarray:
        """ddlm's sampler `sc` over the network from x_init [B, L] (compiled once per setting and shape)."""
        from ddlm.sampling import cli as sampling_cli

        key = (sc.to_json(), x_init.shape)
        if key not in self._samplers:
            cfg = self.config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.sampler = sc
                cfg.sampler.progress, cfg.sampler.visualize = False, False
                cfg.sampler.seq_len = x_init.shape[1]
                cfg.sampler.batch_size = x_init.shape[0]
            sampling_cli.check_config(cfg)
            sample = sampling_cli.sample_fn(cfg, cfg.sampler, self.loaded.model, self.tok, None)
            self._samplers[key] = jax.jit(sample)
        clamp = x_init != self.tok.mask_id
        with self.loaded.context():
            out = self._samplers[key](self.loaded.params, rng, jnp.asarray(x_init), jnp.asarray(clamp))
            return np.asarray(jax.device_get(out.tokens))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.generate([r.args for r in requests])

    def canvas(self, context: str, max_gen_toks: int) -> tuple[list[int], int]:
        """(x_init row [seq_len], start of the generated region): the framed context (cut on the left to leave
        room for max_gen_toks tokens), then masks to the end; an AR row is padded after max_gen_toks masks."""
        n = min(max_gen_toks, self.seq_len - 1)
        prompt = self.prefix(context)[-(self.seq_len - n) :]
        rest = self.seq_len - len(prompt)
        if self.is_ar:
            tail = [self.tok.mask_id] * n + [self.tok.pad_id] * (rest - n)
        else:
            tail = [self.tok.mask_id] * rest
        return prompt + tail, len(prompt)

    def cut(self, ids: Sequence[int], until: Sequence[str]) -> str:
        """The text of generated ids, cut at the first eos / pad / mask and at the first stop sequence."""
        ends = {self.tok.eos_id, self.tok.pad_id, self.tok.mask_id}
        stop = next((i for i, t in enumerate(ids) if int(t) in ends), len(ids))
        text = self.tok.decode([int(t) for t in ids[:stop]])
        for s in until:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    def generate(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """[(context, gen_kwargs)] -> generated texts, batch_size rows per sampler call (module doc)."""
        rows, meta = [], []
        for context, kwargs in requests:
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = _as_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks), 1)
            row, start = self.canvas(context, n)
            rows.append(row)
            meta.append((start, min(n, self.seq_len - start), until))
        out = []
        for b, lo in enumerate(range(0, len(rows), self.batch)):
            chunk = rows[lo : lo + self.batch]
            x = np.asarray(chunk + [chunk[0]] * (self.batch - len(chunk)), np.int32)  # one batch shape
            tokens = self._run_sampler(self.sampler, jax.random.fold_in(jax.random.key(self.seed), b), x)
            for i in range(len(chunk)):
                start, n, until = meta[lo + i]
                out.append(self.cut(tokens[i, start : start + n].tolist(), until))
        return out

    # ------------------------------------------------------------------------------------ lm-eval plumbing

    @property
    def tokenizer_name(self) -> str:
        return f"ddlm-{getattr(self.tok, 'name', type(self.tok).__name__)}"


def main() -> None:
    """lm-eval's command line with the `ddlm` backend registered (module doc); a mistake is one line."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from ddlm import command, compilation_cache

    sys.argv[0] = "lm_eval"
    compilation_cache.enable()  # off with DDLM_COMPILATION_CACHE=0
    with command.one_line_errors():
        cli_evaluate()


if __name__ == "__main__":
    # Run as a script, this file is __main__: the backend is registered by importing it under its own name
    # (the name an entry point gives), so that one class, ddlm.eval.harness:DDLMLM, is `ddlm`.
    from ddlm.eval.harness import main as _main

    _main()
else:
    register_model("ddlm")(DDLMLM)
