"""The requests the server accepts, checked field by field: every mistake is a RequestError naming the field.

    parse_completion(body, limits) -> Request        POST /v1/completions
    parse_chat(body, limits) -> Request              POST /v1/chat/completions

A body is the JSON object the OpenAI client sends. Fields (OpenAI's names and meanings):

    model            the served model's name (GET /v1/models); optional
    prompt           completions: a string, or a list of strings (one generation per string and choice)
    messages         chat: [{"role": "system" | "developer" | "user" | "assistant", "content": text or
                     [{"type": "text", "text": ...}]}], at least one
    max_tokens       generated tokens per choice, 1 .. what the canvas leaves after the prompt (default: all of
                     it); chat also takes max_completion_tokens
    temperature      0 .. 2 (default: the server's sampler's, 1 unless --sampler says otherwise); 0 is greedy
                     (samplers 'parallel' and 'ar')
    top_p, top_k     nucleus mass in (0, 1]; the k most likely tokens (0 = off); default: the server's
    seed             0 .. 2^32 - 1: the same seed gives the same text (default: drawn by the server, returned)
    stop             a string or up to 4: the text ends before the first one
    n                choices per prompt
    stream           server-sent events as the canvas fills in; stream_options.include_usage adds usage
    user             accepted, unused
    ddlm             the diffusion extension (DDLM_FIELDS): sampler, steps, block_length, rule, threshold,
                     factor, gamma, cache, refresh_every, block_sampler (config.sampler fields of the same
                     meaning, README "Sampling"), canvases (stream the intermediate canvases), timeout (s)

OpenAI fields the server cannot honour are refused unless they hold their neutral value (echo false, logprobs
null, presence/frequency penalties 0, ...); any other field is unknown (400). No field names a file: a
request cannot make the server read or write one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
MAX_PROMPTS = 16
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits of the seed: larger seeds would collide

# The diffusion extension: request field -> (config.sampler field, kind).
DDLM_FIELDS = {
    "sampler": ("name", "str"),
    "steps": ("steps", "int"),
    "block_length": ("block_length", "int"),
    "rule": ("rule", "str"),
    "threshold": ("threshold", "number"),
    "factor": ("factor", "number"),
    "gamma": ("gamma", "number"),
    "cache": ("cache", "str"),
    "refresh_every": ("refresh_every", "int"),
    "block_sampler": ("block_sampler", "str"),
}
DDLM_OPTIONS = ("canvases", "timeout")
# OpenAI fields accepted only with the value that changes nothing.
NEUTRAL = {
    "echo": (False,),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "parallel_tool_calls": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream"}
COMMON |= {"stream_options", "user", "ddlm", *NEUTRAL}
COMPLETION_FIELDS = COMMON | {"prompt", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
ROLES = ("system", "developer", "user", "assistant")


class RequestError(ValueError):
    """A malformed request: `param` is the field (dotted path, list indices in brackets), 400."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags)."""

    max_n: int = 8
    max_prompt_tokens: int = 1 << 30  # also bounded by the canvas (checked once tokenized)
    max_timeout: float = 300.0


@dataclasses.dataclass
class Request:
    """A checked request. `prompts`: the texts (completions) or None; `messages`: [(role, text)] (chat)."""

    chat: bool
    prompts: list[str] | None
    messages: list[tuple[str, str]] | None
    model: str | None
    max_tokens: int | None
    max_tokens_field: str  # the field that set it (chat: max_tokens or max_completion_tokens)
    temperature: float | None  # None: the server's sampler's (below too)
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    sampler: dict[str, Any]  # config.sampler field -> value, from the ddlm extension
    canvases: bool
    timeout: float | None


def _type_name(value) -> str:
    return (
        "null" if value is None else type(value).__name__.replace("str", "string").replace("dict", "object")
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(param, value, low, high=None):
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(param, f"expected an integer {bound}, got {value!r}")
    return value


def _number(param, value, low, high, *, low_open=False):
    ok = _is_number(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise RequestError(
            param, f"expected a number in {'(' if low_open else '['}{low}, {high}], got {value!r}"
        )
    return float(value)


def _bool(param, value):
    if not isinstance(value, bool):
        raise RequestError(param, f"expected true or false, got {value!r}")
    return value


def _string(param, value, *, nonempty=False):
    if not isinstance(value, str):
        raise RequestError(param, f"expected a string, got {_type_name(value)}")
    if nonempty and not value:
        raise RequestError(param, "expected a non-empty string")
    return value


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {_type_name(body)}")
    for key in body:
        if key not in allowed:
            raise RequestError(key, f"unknown field; expected some of {sorted(allowed)}")
    for key, values in NEUTRAL.items():
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in values):
            raise RequestError(
                key, f"not supported by this server (only {values[0]!r} is), got {body[key]!r}"
            )


def _stop(value) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STOP:
        raise RequestError("stop", f"expected a string or a list of 1 to {MAX_STOP} strings, got {value!r}")
    for i, s in enumerate(items):
        _string(f"stop[{i}]", s, nonempty=True)
        if len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(items)


def _extension(value, limits: Limits) -> tuple[dict, bool, float | None]:
    """(config.sampler fields, canvases, timeout) of the `ddlm` object."""
    if value is None:
        return {}, False, None
    if not isinstance(value, dict):
        raise RequestError("ddlm", f"expected an object, got {_type_name(value)}")
    fields, canvases, timeout = {}, False, None
    for key, v in value.items():
        param = f"ddlm.{key}"
        if key == "canvases":
            canvases = _bool(param, v)
        elif key == "timeout":
            timeout = _number(param, v, 0.0, limits.max_timeout, low_open=True)
        elif key in DDLM_FIELDS:
            field, kind = DDLM_FIELDS[key]
            if kind == "str":
                fields[field] = _string(param, v, nonempty=True)
            elif kind == "int":
                fields[field] = _int(param, v, 0)
            elif not _is_number(v):
                raise RequestError(param, f"expected a number, got {v!r}")
            else:
                fields[field] = float(v)
        else:
            raise RequestError(
                param, f"unknown field; expected some of {sorted(DDLM_FIELDS) + list(DDLM_OPTIONS)}"
            )
    return fields, canvases, timeout


def _common(body, limits: Limits, *, chat: bool) -> dict:
    model = body.get("model")
    if model is not None:
        _string("model", model)
    max_key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise RequestError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_key = "max_completion_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is not None:
        _int(max_key, max_tokens, 1)
    temperature, top_p, top_k = body.get("temperature"), body.get("top_p"), body.get("top_k")
    if temperature is not None:
        temperature = _number("temperature", temperature, 0.0, 2.0)
    if top_p is not None:
        top_p = _number("top_p", top_p, 0.0, 1.0, low_open=True)
    if top_k is not None:
        _int("top_k", top_k, 0)
    seed = body.get("seed")
    if seed is not None:
        _int("seed", seed, 0, MAX_SEED)
    n = body.get("n")
    n = 1 if n is None else _int("n", n, 1, limits.max_n)
    stream = body.get("stream")
    stream = False if stream is None else _bool("stream", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("stream_options", "only with stream=true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError("stream_options", f"expected {{'include_usage': true|false}}, got {options!r}")
        include_usage = _bool("stream_options.include_usage", options.get("include_usage", False))
    if body.get("user") is not None:
        _string("user", body["user"])
    sampler, canvases, timeout = _extension(body.get("ddlm"), limits)
    if canvases and not stream:
        raise RequestError("ddlm.canvases", "the canvases are streamed: needs stream=true")
    return {
        "model": model,
        "max_tokens": max_tokens,
        "max_tokens_field": max_key,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": _stop(body.get("stop")),
        "n": n,
        "stream": stream,
        "include_usage": include_usage,
        "sampler": sampler,
        "canvases": canvases,
        "timeout": timeout,
    }


def parse_completion(body, limits: Limits) -> Request:
    """A POST /v1/completions body as a Request; RequestError naming the first bad field."""
    _check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise RequestError("prompt", "required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise RequestError("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompt)}")
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(p) for p in prompt):
        raise RequestError("prompt", "token-id prompts are not supported: send the text")
    else:
        raise RequestError("prompt", f"expected a string or a non-empty list of strings, got {prompt!r}")
    fields = _common(body, limits, chat=False)
    best_of = body.get("best_of")
    if best_of is not None and best_of != fields["n"]:
        raise RequestError("best_of", f"not supported (only best_of = n = {fields['n']}), got {best_of!r}")
    if len(prompts) * fields["n"] > limits.max_n:
        raise RequestError(
            "n", f"{len(prompts)} prompts x n={fields['n']} is more than {limits.max_n} generations"
        )
    return Request(chat=False, prompts=prompts, messages=None, **fields)


def _content(param, content) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(param, f"expected a string or a list of text parts, got {_type_name(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            got = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RequestError(f"{param}[{j}].type", f"only 'text' parts are supported, got {got!r}")
        if set(part) - {"type", "text"}:
            raise RequestError(f"{param}[{j}]", f"unknown fields {sorted(set(part) - {'type', 'text'})}")
        texts.append(_string(f"{param}[{j}].text", part.get("text")))
    return "".join(texts)


def parse_chat(body, limits: Limits) -> Request:
    """A POST /v1/chat/completions body as a Request; RequestError naming the first bad field."""
    _check_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise RequestError("messages", "required")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", f"expected a non-empty list of messages, got {messages!r}")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(param, f"expected an object with role and content, got {_type_name(m)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(f"{param}.{min(extra)}", "unknown field; expected role, content, name")
        if m.get("role") not in ROLES:
            raise RequestError(f"{param}.role", f"expected one of {ROLES}, got {m.get('role')!r}")
        if "content" not in m:
            raise RequestError(f"{param}.content", "required")
        if m.get("name") is not None:
            _string(f"{param}.name", m["name"])
        out.append(
            ("system" if m["role"] == "developer" else m["role"], _content(f"{param}.content", m["content"]))
        )
    fields = _common(body, limits, chat=True)
    return Request(chat=True, prompts=None, messages=out, **fields)
