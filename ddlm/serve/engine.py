"""The JAX side of the server: a checkpoint's samplers compiled once per (settings, batch size), rows of
independent requests decoded together, and the live canvases they pass through.

    engine = Engine(loading.load_for_inference(workdir), sampler={"name": "parallel", ...})
    settings = engine.settings(request)                  # the request's config.sampler (RequestError if bad)
    row = engine.row(prompt_ids, settings, seed=..., choice=..., temperature=..., max_tokens=...)
    tokens, nfe = engine.run([row, ...], settings, on_canvas)   # tokens int32 [rows, L], nfe int32 [rows]

Samplers are built by the sampling CLI's own steps (ddlm.sampling.cli: check_config, initial_tokens,
sample_fn), so a request decodes as `--mode=sample` would with the same settings.

Batching without changing anyone's text: the sampler runs under jax.vmap over rows, each row a batch of one
with its own key fold_in(key(seed), choice) -- the key the CLI gives batch `choice` of one sample -- so a
row's randomness never depends on the other rows or on the batch size (choice i of a request with seed s is
sample i of `--config.sampler.seed=s --config.sampler.batch_size=1`). Rows are padded to the smallest of a
few batch sizes (`batch_sizes`), so one program per (settings, size) serves every request: compiled once
(ahead of time, counted in `compiles`), kept in a small LRU.

Per-row temperature: for samplers whose randomness goes through the network's logits (MASKED_LOGITS) the
logits are divided by the row's temperature (an input of the program) and the sampler runs at temperature 1:
the same arithmetic as its own filter (filter_logits divides first), so any temperature shares one program.
Temperature 0 (greedy) and the SEDD samplers' temperature are compiled settings.

Live canvases: every network call of a row reports its input tokens and their positions to the host
(jax.pure_callback, one call per step for the whole batch), which keeps each row's current canvas: the
masked samplers' whole sequence, the KV-cache samplers' decoded slice (AR: the token just decoded; BD3-LM:
the block being denoised, then its clean tokens). on_canvas(row_index, positions, tokens) receives them. A
batch nobody streams runs the same program without the round trips (a lax.cond on the batch's id).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddlm.models.decoding import Decoder
from ddlm.sampling import SAMPLERS
from ddlm.sampling import cli as sampling_cli
from ddlm.sampling import config as sampler_config
from ddlm.serve.schemas import RequestError

# Samplers whose draws are filtered network logits (temperature = dividing the logits).
MASKED_LOGITS = ("ancestral", "cached", "remdm", "first_hitting", "parallel", "ar", "bd3lm")
# Samplers that change a token after it is unmasked (their text is only final at the end).
REMASKING = ("remdm",)
# config.sampler fields the server sets for every request (a --sampler spec may not).
SERVER_FIELDS = {
    "num_samples": 1,
    "batch_size": 1,
    "prompt": "",
    "infill": "",
    "constraints": "",
    "end": 0,
    "seed": 0,
    "progress": False,
    "visualize": False,
    "output_dir": "",
    "truncate_at_eos": True,
    "kv_cache": True,
    "use_ema": True,
    "seq_len": 0,
}
# Request extension fields (config.sampler names) and the samplers they apply to.
APPLIES = {
    "steps": lambda sc: (
        sc.name not in ("ar", "first_hitting")
        and not (sc.name == "bd3lm" and sc.block_sampler == "first_hitting")
    ),
    "block_length": lambda sc: sc.name == "parallel",
    "cache": lambda sc: sc.name == "parallel",
    "refresh_every": lambda sc: sc.name == "parallel",
    "rule": lambda sc: sc.name == "parallel" or (sc.name == "bd3lm" and sc.block_sampler == "parallel"),
    "block_sampler": lambda sc: sc.name == "bd3lm",
}
for _f in ("threshold", "factor", "gamma"):
    APPLIES[_f] = APPLIES["rule"]
# Request field names of the config.sampler fields (for messages).
REQUEST_NAMES = {
    "name": "ddlm.sampler",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "greedy": "temperature",
    **{f: f"ddlm.{f}" for f in APPLIES},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A request's sampler: the resolved config.sampler (`sampler`), how temperature enters, whether
    unmasked tokens are final (text can stream before the end), and the program key."""

    sampler: Any  # ml_collections.ConfigDict
    row_temperature: bool  # the row's temperature divides the logits (else: compiled in, rows use 1)
    final_once_unmasked: bool
    key: tuple


@dataclasses.dataclass
class Row:
    """One generation: its key (seed, choice), canvas x_init / clamp [L], temperature, the generated span
    [start, end) and, while it runs, the live canvas."""

    seed: int
    choice: int
    x_init: np.ndarray
    clamp: np.ndarray
    temperature: float
    start: int
    end: int
    owner: Any = None  # the scheduler's job


class _HookedDecoder(Decoder):
    """A KV-cache decoder whose every step passes through `hook(logits, tokens, positions) -> (logits, zero)`.

    The zero (the host callback's answer) is also added to the cache: a cache write whose logits nobody reads
    (BD3-LM's clean block) would otherwise lose its report to dead-code elimination. x + 0 is x."""

    def __init__(self, model, variables, hook):
        super().__init__(model, variables)
        self._hook = hook

    def step(self, cache, tokens, positions, attend, self_attend=None, t=None, write_index=None):
        logits, cache = super().step(cache, tokens, positions, attend, self_attend, t, write_index)
        logits, zero = self._hook(logits, tokens, positions)
        leaves, tree = jax.tree.flatten(cache)
        leaves[0] = leaves[0] + zero.astype(leaves[0].dtype)
        return logits, jax.tree.unflatten(tree, leaves)

    def forward(self, tokens, t=None, x0=None):  # the no-cache paths: temperature only (kv_cache is True)
        return self._hook(super().forward(tokens, t, x0), None, None)[0]


def parse_sampler_spec(spec: str) -> dict:
    """'parallel:rule=threshold:threshold=0.9' -> {'name': 'parallel', 'rule': 'threshold', 'threshold': 0.9}
    (config.sampler fields cast to their defaults' types); a ValueError naming --sampler otherwise."""
    defaults = sampler_config.default_config()
    name, *items = spec.strip().split(":")
    if name not in SAMPLERS:
        raise ValueError(f"--sampler={spec!r}: unknown sampler {name!r}; expected one of {SAMPLERS}")
    fields = {"name": name}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in defaults or key in SERVER_FIELDS or key == "name":
            raise ValueError(
                f"--sampler={spec!r}: {item!r} is not field=value of a config.sampler field the server does not "
                f"set itself ({', '.join(sorted(SERVER_FIELDS))})"
            )
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                fields[key] = value.lower() in ("true", "1")
            else:
                fields[key] = type(default)(value)
        except ValueError:
            raise ValueError(
                f"--sampler={spec!r}: {key}={value!r} is not a {type(default).__name__}"
            ) from None
    return fields


class Engine:
    """Compiled samplers of one loaded checkpoint (ddlm.loading.Loaded) and the batches they run."""

    def __init__(
        self,
        loaded,
        *,
        sampler: dict | None = None,
        batch_sizes=(1, 4, 16),
        max_programs: int = 16,
        compiler_options: dict | None = None,
    ):
        self.loaded = loaded
        self.config = loaded.config
        self.tok = loaded.tokenizer
        self.seq_len = int(self.config.train.seq_len)
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"--batch_sizes must be integers >= 1, got {batch_sizes!r}")
        self.max_programs = max_programs
        self.compiler_options = compiler_options
        base = sampling_cli.resolve_config(self.config.sampler)
        for key, value in (sampler or {}).items():
            base[key] = value
        if base.name in ("ar", "bd3lm"):
            base.stop_at_eos = True  # a row ends at its eos (its batch when every row has)
        for key, value in SERVER_FIELDS.items():
            base[key] = value
        self.base = base
        self._lock = threading.Lock()  # the callbacks may run on several XLA threads
        self._run_lock = threading.Lock()
        self._settings_cache: collections.OrderedDict = collections.OrderedDict()
        self._settings(base, "--sampler")  # a bad --sampler is one line naming it
        self.default_settings = self.settings(None, None, None, {})  # what a request that sets nothing gets
        self.samplers = [name for name in SAMPLERS if self._accepts(name)]
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self.compiles = 0
        self.compile_seconds = 0.0
        self._active: tuple[int, Callable] | None = None
        self._batch_id = 0
        self._piece_cache: dict[int, str] = {}

    # ---------------------------------------------------------------------------------------- settings

    def temperature(self, value: float | None) -> float:
        """A request's temperature: its own, else the server sampler's (0 when it is greedy)."""
        if value is not None:
            return value
        return 0.0 if self.base.greedy else float(self.base.temperature)

    def settings(
        self, temperature: float | None, top_p: float | None, top_k: int | None, fields: dict
    ) -> Settings:
        """The config.sampler of a request: the server's with the request's fields (None: the server's);
        RequestError naming the request field when the sampler, the network or the length refuses it."""
        temperature = self.temperature(temperature)
        top_p = self.base.top_p if top_p is None else top_p
        top_k = self.base.top_k if top_k is None else top_k
        sc = ml_collections.ConfigDict(self.base.to_dict())
        if "name" in fields and fields["name"] != sc.name:  # another sampler: its own defaults
            sc = sampler_config.default_config()
            for key, value in SERVER_FIELDS.items():
                sc[key] = value
            sc.name = fields["name"]
            sc.stop_at_eos = fields["name"] in ("ar", "bd3lm")
        for key, value in fields.items():
            sc[key] = value
        for key in fields:
            if key in APPLIES and not APPLIES[key](sc):
                raise RequestError(REQUEST_NAMES[key], f"does not apply to sampler {sc.name!r}")
        sc.top_p, sc.top_k = top_p, top_k
        if sc.name in MASKED_LOGITS and temperature > 0:
            sc.temperature, sc.greedy = 1.0, False
        elif temperature == 0 and sc.name == "ar":
            sc.temperature, sc.greedy = 1.0, True
        else:
            sc.temperature, sc.greedy = temperature, False
        key = _key(sc)
        with self._lock:
            cached = self._settings_cache.get(key)
        if cached is not None:
            return cached
        settings = self._settings(sc, None)
        with self._lock:
            self._settings_cache[key] = settings
            while len(self._settings_cache) > 256:
                self._settings_cache.popitem(last=False)
        return settings

    def _accepts(self, name: str) -> bool:
        try:
            self.settings(1.0, 1.0, 0, {"name": name})
        except RequestError:
            return False
        return True

    def _settings(self, sc, flag: str | None) -> Settings:
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.sampler = sc
        config.sampler.seq_len = self.seq_len
        try:
            sc, _ = sampling_cli.check_config(config)
        except ValueError as e:
            if flag is not None:
                raise ValueError(f"{flag}: {e}") from None
            raise _request_error(str(e)) from None
        row_temperature = sc.name in MASKED_LOGITS and not (sc.greedy or sc.temperature == 0)
        final = (
            self.config.diffusion.process == "absorbing"
            and sc.name not in REMASKING
            and sc.parallel_remasking == "none"
            and not (sc.name == "bd3lm" and sc.block_sampler in REMASKING)
        )
        return Settings(sampler=sc, row_temperature=row_temperature, final_once_unmasked=final, key=_key(sc))

    # ---------------------------------------------------------------------------------------- rows

    def prompt_ids(self, text: str, settings: Settings) -> list[int]:
        """bos / the SFT template + the prompt's ids, as `--mode=sample` with --config.sampler.prompt=text."""
        from ddlm.data import sft

        tok = self.tok
        if sft.is_sft(self.config.data):
            return sft.encode_prompt(tok, text, self.config.data.sft_template)
        ids = tok.encode(text) if text else []
        return [tok.bos_id] + ids if settings.sampler.name in ("ar", "bd3lm") else ids

    def chat_ids(self, messages: list[tuple[str, str]], settings: Settings) -> list[int]:
        """The conversation as the model's prompt. An SFT model (config.data.sft_template): each user turn
        through the template (sft.template_prompt: one user turn is exactly the CLI's prompt), the others as
        their text and a newline, after bos. Other models continue the messages' text joined by newlines."""
        from ddlm.data import sft

        if not sft.is_sft(self.config.data):
            return self.prompt_ids("\n".join(text for _, text in messages) + "\n", settings)
        parts = []
        for role, text in messages:
            parts.append(
                sft.template_prompt(text, self.config.data.sft_template) if role == "user" else text + "\n"
            )
        if messages[-1][0] == "assistant":  # the model continues the assistant's text
            parts[-1] = parts[-1][:-1]
        return [self.tok.bos_id] + self.tok.encode("".join(parts))

    def row(self, prompt_ids, settings: Settings, *, seed, choice, temperature, max_tokens) -> Row:
        """A Row of `max_tokens` generated tokens after prompt_ids (initial_tokens as the CLI builds them)."""
        x_init, clamp = sampling_cli.initial_tokens(
            self.config, settings.sampler, self.tok, self.seq_len, prompt_ids
        )
        x_init, clamp = x_init[0], clamp[0]
        start = len(prompt_ids)
        end = start + max_tokens
        sc = settings.sampler
        if sc.name == "bd3lm":  # block-causal: the blocks after the last one asked for change nothing before
            block = int(self.config.model.block_size)
            tail = -(-end // block) * block
            x_init[tail:], clamp[tail:] = self.tok.pad_id, True
        return Row(
            seed=seed,
            choice=choice,
            x_init=x_init,
            clamp=clamp,
            temperature=temperature if settings.row_temperature else 1.0,
            start=start,
            end=end,
        )

    # ---------------------------------------------------------------------------------------- programs

    def bucket(self, rows: int) -> int:
        """The smallest compiled batch size that holds `rows` (rows <= max batch size)."""
        return next(b for b in self.batch_sizes if b >= rows)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def program(self, settings: Settings, size: int):
        """The compiled program of (settings, batch size), compiling it on first use (LRU of max_programs)."""
        key = (settings.key, size)
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                return self._programs[key]
        compiled = self._compile(settings, size)
        with self._lock:
            self._programs[key] = compiled
            while len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)
        return compiled

    def _compile(self, settings: Settings, size: int):
        config, model, tok = self.config, self.loaded.model, self.tok
        sc = settings.sampler
        emit = self._emit

        def one_row(params, rng, x, clamp, temperature, row, batch_id):
            def report(tokens, positions):
                return jax.pure_callback(
                    emit,
                    jax.ShapeDtypeStruct((), jnp.float32),
                    batch_id,
                    row,
                    tokens,
                    positions,
                    vmap_method="expand_dims",  # one call per step for the whole batch
                )

            def hook(logits, tokens, positions):
                """(logits / the row's temperature, zero): tokens [1, S] at positions [S] reported to the host
                (masked samplers: positions None, the whole sequence); the zero is the callback's answer, to be
                used (logits + zero) so that the call stays in the program."""
                zero = jnp.zeros((), jnp.float32)
                if tokens is not None:
                    positions = jnp.arange(tokens.shape[-1]) if positions is None else positions
                    # batch_id 0: nobody watches, no host round trip (the predicate is the batch's, not a row's)
                    zero = jax.lax.cond(
                        batch_id > 0,
                        report,
                        lambda *_: jnp.zeros((), jnp.float32),
                        tokens[0].astype(jnp.int32),
                        jnp.asarray(positions, jnp.int32),
                    )
                return (logits + zero) / temperature, zero

            sample = sampling_cli.sample_fn(
                config,
                sc,
                model,
                tok,
                None,
                logits_hook=lambda logits, xt: hook(logits, xt, None)[0],
                make_decoder=functools.partial(_HookedDecoder, hook=hook),
            )
            out = sample(params, rng, x[None], clamp[None])
            return out.tokens[0].astype(jnp.int32), jnp.asarray(out.nfe, jnp.int32)

        batched = jax.vmap(one_row, in_axes=(None, 0, 0, 0, 0, 0, None))
        args = (
            self.loaded.params,
            jax.ShapeDtypeStruct((size,), jax.random.key(0).dtype),
            jax.ShapeDtypeStruct((size, self.seq_len), jnp.int32),
            jax.ShapeDtypeStruct((size, self.seq_len), jnp.bool_),
            jax.ShapeDtypeStruct((size,), jnp.float32),
            jax.ShapeDtypeStruct((size,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        t0 = time.time()
        with self.loaded.context():
            compiled = jax.jit(batched, compiler_options=self.compiler_options).lower(*args).compile()
        seconds = time.time() - t0
        with self._lock:
            self.compiles += 1
            self.compile_seconds += seconds
        logging.info("Compiled %s for batch size %d in %.1fs.", sc.name, size, seconds)
        return compiled

    def warmup(self, settings: Settings | None = None) -> float:
        """Compiles the default settings' program for every batch size; returns the seconds taken."""
        t0 = time.time()
        for size in self.batch_sizes:
            self.program(settings or self.default_settings, size)
        return time.time() - t0

    # ---------------------------------------------------------------------------------------- running

    def run(self, rows: list[Row], settings: Settings, on_canvas: Callable | None = None):
        """Decodes rows (at most max_batch, one settings) in one padded batch. on_canvas(i, positions,
        tokens) is called from the running program for row i's network inputs (None: no host callbacks). Returns (tokens int32
        [len(rows), L], nfe int32 [len(rows)], batch size)."""
        with self._run_lock:  # one batch at a time on the device (schedulers may share an engine)
            return self._run(rows, settings, on_canvas)

    def _run(self, rows, settings, on_canvas):
        size = self.bucket(len(rows))
        compiled = self.program(settings, size)
        pad = size - len(rows)
        # Padding rows: nothing to generate (every position known), so they cost no more than the others.
        filler = np.full((self.seq_len,), self.tok.pad_id, np.int32)
        x = np.stack([r.x_init for r in rows] + [filler] * pad)
        clamp = np.stack([r.clamp for r in rows] + [np.ones(self.seq_len, bool)] * pad)
        keys = jnp.stack(
            [jax.random.fold_in(jax.random.key(r.seed), r.choice) for r in rows] + [jax.random.key(0)] * pad
        )
        temps = np.asarray([r.temperature for r in rows] + [1.0] * pad, np.float32)
        with self._lock:
            self._batch_id += 1
            batch_id = self._batch_id if on_canvas is not None else 0
            self._active = (batch_id, len(rows), on_canvas)
        try:
            tokens, nfe = compiled(
                self.loaded.params, keys, x, clamp, temps, np.arange(size, dtype=np.int32), np.int32(batch_id)
            )
            tokens, nfe = np.asarray(tokens), np.asarray(nfe)
        finally:
            with self._lock:
                self._active = None
        return tokens[: len(rows)], nfe[: len(rows)], size

    def _emit(self, batch_id, rows, tokens, positions):
        """The programs' host callback: batch_id [1], rows [B], tokens [B, S], positions [1 | B, S]."""
        out = np.zeros(np.shape(rows), np.float32)
        active = self._active
        if active is None or active[0] != int(np.ravel(batch_id)[0]) or active[2] is None:
            return out
        _, count, on_canvas = active
        positions = np.broadcast_to(np.asarray(positions), np.shape(tokens))
        for i, row in enumerate(np.ravel(rows)):
            if row < count:
                keep = positions[i] < self.seq_len  # the AR prefill writes whole chunks past the end
                on_canvas(int(row), positions[i][keep], np.asarray(tokens[i])[keep])
        return out

    # ---------------------------------------------------------------------------------------- text

    def piece(self, token: int) -> str:
        """The text of one token (memoized); '' for pad / bos / eos."""
        text = self._piece_cache.get(token)
        if text is None:
            text = self._piece_cache[token] = self.tok.decode([token])
        return text


def _key(sc) -> tuple:
    """The hashable identity of a resolved config.sampler (programs and settings are cached by it)."""
    return tuple(sorted((k, v) for k, v in sc.to_dict().items()))


def _request_error(message: str) -> RequestError:
    """A sampler's 'config.sampler.<field> ...' message as a RequestError naming the request's field."""
    import re

    match = re.search(r"config\.sampler\.(\w+)", message)
    field = match.group(1) if match else "ddlm"
    param = REQUEST_NAMES.get(field, f"ddlm.{field}")
    if match:
        message = message.replace(match.group(0), param)
    return RequestError(param, message)
