"""The points of the speed-quality frontier (ddlm.eval.frontier sweeps them, ddlm.eval.plots draws them):
(unigram entropy, generative perplexity, tokens/s) of one sampler setting, their file, their Pareto front,
their match against the autoregressive baseline, their table. Plain Python: no jax, no matplotlib.

Generative perplexity alone rewards collapsed samples (low temperature, float32 Gumbel noise): a point is
only better than another if it has lower perplexity at no lower entropy, so the frontier is the set of points
no other point beats on both (`pareto_front`), read against the data's own (entropy, perplexity).
`matches_ar` names the cheapest diffusion setting whose samples match each AR point (same entropy and
generative perplexity within their error bars) and its speed relative to AR. Scoring with the AR model
itself favours its own samples: read the AR points as the target the diffusion model must reach, not as an
independent quality judgement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

FRONTIER_FILE = "frontier.json"


@dataclasses.dataclass
class FrontierPoint:
    label: str  # the model (run) or 'data'
    sampler: str  # sampler name ('' for the data)
    steps: int  # sampler steps (0 for the data)
    temperature: float
    precision: str  # Gumbel-noise precision of the sampler
    entropy: float  # mean unigram entropy of a sample (nats)
    entropy_se: float
    gen_ppl: float  # generative perplexity under the AR scorer
    gen_ppl_se: float
    tokens_per_s: float  # generated tokens per second (compilation excluded); nan for the data
    nfe: float  # network calls per sample batch
    samples: int
    distinct_4: float = float("nan")
    mauve: float = float("nan")  # MAUVE against the data (--mauve_seeds; ddlm.eval.mauve), nan when not run
    mauve_se: float = float("nan")  # its standard error over k-means seeds

    @classmethod
    def from_quality(cls, label: str, q: dict) -> FrontierPoint:
        """From the dict of cli.sample_and_score (or sample_quality.sample_quality plus sampler fields)."""
        nan = float("nan")
        return cls(
            label=label,
            sampler=q.get("sampler", ""),
            steps=int(q.get("steps", 0)),
            temperature=float(q.get("temperature", nan)),
            precision=q.get("precision", ""),
            entropy=q["entropy"],
            entropy_se=q["entropy_se"],
            gen_ppl=q.get("gen_ppl", nan),
            gen_ppl_se=q.get("gen_ppl_se", nan),
            tokens_per_s=q.get("tokens_per_s", nan),
            nfe=q.get("nfe", nan),
            samples=int(q["samples"]),
            distinct_4=q.get("distinct_4", nan),
            mauve=q.get("mauve", nan),
            mauve_se=q.get("mauve_se", nan),
        )


def save(path: str, points: Sequence[FrontierPoint]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"points": [dataclasses.asdict(p) for p in points]}, f, indent=1)


def load(path: str) -> list[FrontierPoint]:
    """The points of a frontier file (`save`); a ValueError naming the file if it is missing, not JSON, or
    not a 'points' list of FrontierPoint fields of their types."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: sweep that workdir first (python -m ddlm.eval.frontier)")
    expected = "a 'points' list of FrontierPoint fields"
    try:
        with open(path) as f:
            data = json.load(f)
        points = [FrontierPoint(**p) for p in data["points"]]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a frontier file (not JSON: {e}); expected {expected}") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a frontier file ({expected}): {e}") from None
    types = {"str": (str,), "int": (int,), "float": (int, float)}
    for i, p in enumerate(points):
        for field in dataclasses.fields(FrontierPoint):
            value = getattr(p, field.name)
            if isinstance(value, bool) or not isinstance(value, types[field.type]):
                raise ValueError(
                    f"{path}: point {i}: {field.name}={value!r} is not a {field.type} (not a frontier file)"
                )
    return points


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point dominates (entropy >= and gen_ppl <=, one of them strictly), by entropy."""

    def dominates(a, b):
        return (
            a.entropy >= b.entropy
            and a.gen_ppl <= b.gen_ppl
            and (a.entropy > b.entropy or a.gen_ppl < b.gen_ppl)
        )

    valid = [p for p in points if not (math.isnan(p.entropy) or math.isnan(p.gen_ppl))]
    front = [p for p in valid if not any(dominates(q, p) for q in valid)]
    return sorted(front, key=lambda p: p.entropy)


# --------------------------------------------------------------------------------------------
# Diffusion against the autoregressive baseline
# --------------------------------------------------------------------------------------------


def _close(a: float, b: float, se_a: float, se_b: float, z: float) -> bool:
    return abs(a - b) <= z * math.sqrt(se_a**2 + se_b**2)


def matches_ar(points: Sequence[FrontierPoint], ar_sampler: str = "ar", z: float = 2.0) -> list[dict]:
    """For each AR point (sampler `ar_sampler`): the diffusion points that match it, i.e. whose unigram
    entropy is within z combined standard errors of the AR point's and whose generative perplexity is not
    worse by more than z combined standard errors (lower is fine), and the cheapest of them (fewest network
    calls, then most tokens/s).

    Returns one dict per AR point: {'ar': point, 'matches': [points], 'best': point or None,
    'speed_ratio': best.tokens_per_s / ar.tokens_per_s or nan}."""
    ar_points = [p for p in points if p.sampler == ar_sampler]
    others = [p for p in points if p.sampler not in (ar_sampler, "") and p.label != "data"]
    out = []
    for a in ar_points:
        found = [
            d
            for d in others
            if _close(d.entropy, a.entropy, d.entropy_se, a.entropy_se, z)
            and d.gen_ppl - a.gen_ppl <= z * math.sqrt(d.gen_ppl_se**2 + a.gen_ppl_se**2)
        ]
        best = min(found, key=lambda d: (d.nfe, -d.tokens_per_s)) if found else None
        ratio = best.tokens_per_s / a.tokens_per_s if best is not None and a.tokens_per_s > 0 else math.nan
        out.append({"ar": a, "matches": found, "best": best, "speed_ratio": ratio})
    return out


# --------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------


def short_name(spec: str) -> str:
    """'parallel:rule=threshold:threshold=0.9' -> 'parallel(threshold,0.9)'; a bare name stays as it is."""
    name, *items = spec.split(":")
    return f"{name}({','.join(i.partition('=')[2] for i in items)})" if items else name


def point_name(p: FrontierPoint) -> str:
    steps = f"{p.steps} steps" if p.steps else f"NFE {p.nfe:g}"
    return f"{p.label} {short_name(p.sampler)} {steps} T={p.temperature:g} {p.precision}"


def format_points(points: Sequence[FrontierPoint]) -> str:
    front = {id(p) for p in pareto_front([p for p in points if p.label != "data"])}
    header = (
        f"{'':2s}{'label':14s} {'sampler':28s} {'steps':>5s} {'NFE':>5s} {'temp':>5s} {'noise':>8s} "
        f"{'entropy':>15s} {'gen. ppl':>17s} {'tokens/s':>10s}"
    )
    with_mauve = any(not math.isnan(p.mauve) for p in points)
    lines = [header + (f" {'MAUVE':>15s}" if with_mauve else "")]
    for p in points:
        steps = f"{p.steps:5d}" if p.steps else f"{'-':>5s}"
        nfe = f"{'-':>5s}" if math.isnan(p.nfe) else f"{p.nfe:5.0f}"
        lines.append(
            f"{'*' if id(p) in front else ' ':2s}{p.label[:14]:14s} {short_name(p.sampler)[:28]:28s} {steps} "
            f"{nfe} {p.temperature:5.2f} {p.precision[:8]:>8s} {p.entropy:7.3f} ± {p.entropy_se:5.3f} "
            f"{p.gen_ppl:8.2f} ± {p.gen_ppl_se:6.2f} {p.tokens_per_s:10.0f}"
            + (f" {p.mauve:7.3f} ± {p.mauve_se:5.3f}" if with_mauve else "")
        )
    lines.append("* on the frontier: no other model point has higher entropy and lower generative perplexity")
    for m in matches_ar(points):
        a = m["ar"]
        if m["best"] is None:
            lines.append(f"{point_name(a)}: no diffusion point matches its entropy and generative perplexity")
        else:
            lines.append(
                f"{point_name(a)}: matched by {len(m['matches'])} point(s); cheapest {point_name(m['best'])} "
                f"at {m['speed_ratio']:.2f}x its tokens/s"
            )
    return "\n".join(lines)
