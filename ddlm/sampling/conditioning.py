"""Conditioning for samplers: prompts, infilling templates, hard token constraints, length control, and
classifier-free guidance.

Every form of conditioning on known tokens is the same thing to a masked-diffusion sampler: `x_init`
holds the known tokens and mask_id elsewhere; the reverse step carries decoded tokens over, so known
tokens are clamped, and the exact denoiser then samples the exact conditional p(x_unknown | x_known).

    x_init = initial_tokens(batch, length, mask_id, prompt_ids=..., template_ids=..., constraints=...,
                            end=..., eos_id=..., pad_id=...)
    template_ids = parse_infill_template("The [MASK:20] sat on the mat.", tok.encode, mask_id)
    denoise_fn = guided_denoise_fn(denoise_fn, cond_mask=x_init != mask_id, mask_id=mask_id, scale=w)
    tokens = truncate_after_eos(tokens, eos_id, pad_id)
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MASK_PLACEHOLDER = re.compile(r"\[MASK(?::(\d+))?\]")
# Anything that starts like a placeholder ('[MASK', '[mask', '[ MASK') must be a well-formed one: a typo such
# as '[MASK:x]' or '[MASK:3' would otherwise be encoded silently as literal text.
_PLACEHOLDER_START = re.compile(r"\[\s*mask", re.IGNORECASE)
_CONSTRAINT = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_infill_template(
    template: str, encode: Callable[[str], list[int]], mask_id: int, *, field: str = "config.sampler.infill"
) -> list[int]:
    """'The [MASK:20] sat on the mat.' -> ids of 'The ', 20 x mask_id, ids of ' sat on the mat.'.

    '[MASK]' is one masked token, '[MASK:n]' n >= 1 of them. The text between placeholders is encoded piece
    by piece, so the known tokens are exactly encode(piece). A malformed placeholder ('[MASK:x]',
    '[MASK:-3]', '[MASK:0]', an unclosed '[MASK:3', '[mask]') is a ValueError naming `field`."""
    ids: list[int] = []
    pos = 0
    for start in _PLACEHOLDER_START.finditer(template):
        match = MASK_PLACEHOLDER.match(template, start.start())
        count = int(match.group(1)) if match and match.group(1) is not None else 1
        if match is None or count < 1:
            close = template.find("]", start.start())
            snippet = template[
                start.start() : close + 1 if 0 <= close < start.start() + 16 else start.end() + 8
            ]
            raise ValueError(
                f"{field}: malformed placeholder {snippet!r} at character {start.start()}; expected [MASK] "
                "or [MASK:n] with an integer n >= 1"
            )
        if match.start() > pos:
            ids.extend(encode(template[pos : match.start()]))
        ids.extend([mask_id] * count)
        pos = match.end()
    if pos < len(template):
        ids.extend(encode(template[pos:]))
    return ids


def parse_constraints(
    spec: str,
    *,
    vocab_size: int | None = None,
    mask_id: int | None = None,
    length: int | None = None,
    field: str = "config.sampler.constraints",
) -> dict[int, int]:
    """'0:17,5:3' -> {0: 17, 5: 3} (position: token id); a negative position counts from the end.

    Every mistake is a ValueError naming `field`: an item that is not 'pos:id' with integers, a repeated
    position, a negative id, an id >= vocab_size or equal to mask_id, a position outside [-length, length)
    (the last three only checked when vocab_size / mask_id / length are given)."""
    out: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        match = _CONSTRAINT.match(item)
        if match is None:
            raise ValueError(
                f"{field}: {item!r} is not 'pos:id' with an integer position and token id "
                f"(expected e.g. '0:17,5:3'), in {spec!r}"
            )
        pos, tok = int(match.group(1)), int(match.group(2))
        if pos in out:
            raise ValueError(f"{field}: position {pos} is constrained twice, in {spec!r}")
        if tok < 0 or (vocab_size is not None and tok >= vocab_size):
            upper = "" if vocab_size is None else f", {vocab_size}"
            raise ValueError(f"{field}: token id {tok} in {item!r} is outside the vocabulary [0{upper})")
        if mask_id is not None and tok == mask_id:
            raise ValueError(f"{field}: token id {tok} in {item!r} is the mask id (that is no constraint)")
        if length is not None and not -length <= pos < length:
            raise ValueError(
                f"{field}: position {pos} in {item!r} is outside a sequence of length {length} "
                f"(positions are 0..{length - 1}, or -{length}..-1 from the end)"
            )
        out[pos] = tok
    return out


def initial_tokens(
    batch: int,
    length: int,
    mask_id: int,
    *,
    prompt_ids: Sequence[int] = (),
    template_ids: Sequence[int] | None = None,
    constraints: Mapping[int, int] | None = None,
    end: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """x_init int32 [batch, length]: mask_id everywhere except the known tokens.

    prompt_ids: a prefix. template_ids: ids from parse_infill_template, placed at the start (after the
    prompt); positions after it are generated freely. constraints: {position: token id} (negative positions
    count from the end). end > 0: length control, the sequence ends at position `end`: it holds eos_id and
    every later position pad_id (eos_id if pad_id is None). Later sources override earlier ones at the same
    position. Errors name the config.sampler field they come from.
    """
    x = np.full((batch, length), mask_id, dtype=np.int32)
    known = list(prompt_ids) + (list(template_ids) if template_ids is not None else [])
    if len(known) > length:
        raise ValueError(
            f"config.sampler.prompt + config.sampler.infill are {len(known)} tokens, longer than the "
            f"generated length {length} (config.sampler.seq_len, or config.train.seq_len if 0)"
        )
    x[:, : len(known)] = np.asarray(known, dtype=np.int32)
    for pos, tok in (constraints or {}).items():
        if not -length <= pos < length:
            raise ValueError(
                f"config.sampler.constraints: position {pos} is outside a sequence of length {length}"
            )
        x[:, pos] = tok
    if end:
        if not 0 < end <= length:
            raise ValueError(f"config.sampler.end must be in [0, {length}] (the generated length), got {end}")
        if eos_id is None:
            raise ValueError("length control (config.sampler.end > 0) needs a tokenizer with an eos id")
        if end < length:
            x[:, end] = eos_id
            x[:, end + 1 :] = eos_id if pad_id is None else pad_id
    return x


def truncate_after_eos(tokens, eos_id: int, pad_id: int):
    """Every position after the first eos_id becomes pad_id (the eos itself is kept). tokens: [B, L]."""
    is_eos = tokens == eos_id
    after = (jnp.cumsum(is_eos, axis=-1) - is_eos) > 0
    return jnp.where(after, pad_id, tokens)


def guided_denoise_fn(denoise_fn, cond_mask, mask_id: int, scale: float):
    """Classifier-free guidance in LLaDA's form (Nie et al. 2025, eq. 16): the unconditional input is x_t
    with the conditioning positions (cond_mask [B, L] True: the prompt / known tokens) masked, and

        log p~(x_0 | x_t) = (1 + w) log p(x_0 | x_t) - w log p(x_0 | x_t with the prompt masked)   (+ const).

    Both inputs go through one call on a [2B, L] batch. scale w = 0 is plain conditional sampling.
    Returns a denoise_fn with the same signature (its output is normalised log-probs)."""
    cond_mask = jnp.asarray(cond_mask, bool)

    def fn(xt, t):
        uncond = jnp.where(cond_mask, mask_id, xt)
        logits = denoise_fn(jnp.concatenate([xt, uncond], 0), jnp.concatenate([t, t], 0))
        logits = logits.astype(jnp.float32).at[..., mask_id].set(-1e6)
        cond_lp, uncond_lp = jnp.split(jax.nn.log_softmax(logits, axis=-1), 2, axis=0)
        return (1.0 + scale) * cond_lp - scale * uncond_lp

    return fn
