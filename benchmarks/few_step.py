"""Few-step generation (issue 23): each teacher at many steps against the same teacher and its distilled student at
4-32 steps, in one run, judged by a model that is neither side.

    python benchmarks/few_step.py            # runs/few_step/{mdlm,duo,sdtt,dcd} (experiments/few_step.py), runs/judge
    python benchmarks/few_step.py --dry-run  # random networks of the recipes' shapes, tiny: every path in minutes

Protocol: the prompts, judge and metrics of benchmarks/speed_quality.py (issue 27), so the figures share its scale:
bos + 15 held-out characters, 112 new characters (the 128-character training context), temperature 1, full
vocabulary, float64 noise; gen-ppl under runs/judge with its SE over samples, mean unigram entropy with its SE,
MAUVE against the held-out continuations with a bootstrap error bar. Every setting continues the same prompts with
the same keys. NFE = network calls (batch-wide).

  * The reference of a family is its teacher at the most steps in --teacher_steps (1,024 by default: 9x the new
    tokens, so more steps change nothing the judge can see; the 256-step row shows it).
  * gap(model, k) = gen-ppl(model at k steps) - gen-ppl(reference); the issue's criterion at k = 4 and 8: the
    student's gap <= half the undistilled teacher's gap at the same k, with the student's entropy within 2% of
    the reference's. Printed per k with the ratio gap(student) / gap(teacher) and its bootstrap-free error
    (delta method on the three independent gen-ppl SEs).
  * The students (STUDENTS: the papers' settings and variants, runs/few_step/<name>) are each run's newest
    checkpoint (the last round's), sampled at every k with their teacher's sampler, and, for each k an earlier
    round was distilled for (round r: base_steps / 2^r steps), that round's checkpoint at k ('<name>@<step>').
    The criterion reads the k-step student: the round distilled for k where there is one, as the papers sample
    each round's student at its own step count (--final_only: the newest checkpoint only).
  * Samplers: MDLM and SDTT, the masked ancestral sampler (`ancestral`) on the loglinear grid; DUO and DCD, the
    uniform graph's exact reverse step (`sedd_analytic`, through losses.duo_log_ratios), prompt positions clamped.
    VARIANTS adds the DUO teacher's few-step rows with the greedy tail and with Psi predictor-corrector steps
    (`psi`: strength 0.3, one corrector call per step, so about twice the NFE), and each teacher at temperature
    0.9 (what lowering the entropy alone buys: a student that is not below that curve at its own entropy has
    only sharpened), outside the criterion.
  * The wall-clock cost of each run comes from its metrics.jsonl (first to last logged step, at the load it ran
    at: benchmarks/RESULTS.md says which).

Printed: the table per teacher and each student's criterion lines; written: --out (gen-ppl and entropy against
steps) and the JSON beside it. --students=sdtt,dcd picks students; --from_json re-prints a written JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import machine  # benchmarks/machine.py
import speed_quality as sq  # benchmarks/speed_quality.py: prompts, canvas, MAUVE's bootstrap, formatting

from ddlm.checkpoints import CheckpointError
from ddlm.sampling import config as sampler_config

WORKDIRS = {"mdlm": "few_step/mdlm", "duo": "few_step/duo", "judge": "judge"}  # the students: few_step/<name>
TEACHERS = {"mdlm": ("MDLM", {"name": "ancestral"}), "duo": ("DUO", {"name": "sedd_analytic"})}  # label, sampler
STUDENTS = (  # (name = its run under --root/few_step, teacher, label): each sampled with its teacher's sampler
    ("sdtt", "mdlm", "SDTT, reverse KL (the paper's), 128 -> 4 steps in 5 rounds of 600"),
    ("sdtt_fkl", "mdlm", "SDTT, forward KL, 128 -> 4 steps in 5 rounds of 600"),
    ("dcd", "duo", "DCD (the paper's reverse KL), T = 128, 5 rounds of 600"),
    ("dcd_b32", "duo", "DCD, T = 32, 3 rounds of 1,000"),
    ("dcd_long", "duo", "DCD, T = 32, 3 rounds of 1,600"),
)
# The teachers' few-step rows with other samplers of the same network (not students: no criterion), (name, fields).
VARIANTS = {
    "mdlm": (("mdlm T=0.9", {"name": "ancestral", "temperature": 0.9}),),  # the teacher, sharpened
    "duo": (
        ("duo T=0.9", {"name": "sedd_analytic", "temperature": 0.9}),
        ("duo+greedy", {"name": "psi", "greedy_tail": 1}),  # DUO's greedy noise removal on the last call
        ("duo+psi", {"name": "psi", "psi_strength": 0.3, "psi_corrector_steps": 1}),  # a corrector call per step
    ),
}
CRITERION_STEPS = (4, 8)
ROLES = {"teacher": "undistilled", "student": "distilled", "variant": "undistilled, another sampler"}
ENTROPY_TOLERANCE = 0.02  # the student's entropy within 2% of the reference's


# ----------------------------------------------------------------------------------------------------------
# Pure pieces (tested in tests/test_few_step.py)
# ----------------------------------------------------------------------------------------------------------


def workdir(root: str, run: str) -> str:
    """A run's workdir under --root: WORKDIRS', else few_step/<run>."""
    return os.path.join(root, WORKDIRS.get(run, f"few_step/{run}"))


def gap_ratio(student: dict, teacher: dict, reference: dict) -> tuple[float, float]:
    """(gap(student) / gap(teacher), its SE by the delta method): gaps in gen-ppl to the reference, the three
    gen-ppl estimates independent (different samples). NaN when the teacher's gap is not positive."""
    r, se_r = reference["gen_ppl"], reference["gen_ppl_se"]
    gs, gt = student["gen_ppl"] - r, teacher["gen_ppl"] - r
    if not gt > 0:
        return float("nan"), float("nan")
    q = gs / gt
    # d q / d student = 1/gt; d q / d teacher = -gs/gt^2; d q / d reference = (-gt + gs)/gt^2
    var = (student["gen_ppl_se"] / gt) ** 2 + (teacher["gen_ppl_se"] * gs / gt**2) ** 2
    var += (se_r * (gs - gt) / gt**2) ** 2
    return q, math.sqrt(var)


def criterion(student: dict, teacher: dict, reference: dict, tolerance: float = ENTROPY_TOLERANCE) -> dict:
    """The issue's check at one step count: half the gap or better, at entropy within `tolerance` (relative)."""
    q, se = gap_ratio(student, teacher, reference)
    rel = abs(student["entropy"] - reference["entropy"]) / reference["entropy"]
    return {"gap_ratio": q, "gap_ratio_se": se, "entropy_rel": rel,
            "half_gap": bool(q <= 0.5), "entropy_ok": bool(rel <= tolerance), "met": bool(q <= 0.5 and rel <= tolerance)}  # fmt: skip


def round_students(distill, train_steps: int) -> dict[int, int]:
    """{k: checkpoint step} of a distillation run (its config.distill, experiments/few_step.py's layout: a
    checkpoint at each round's end): round r = 1..rounds ends at step r * refresh_every (the last at
    train_steps) with a student that samples in base_steps / 2^r steps (SDTT: teacher_steps = 2 teacher steps
    per student step; DCD: the pair gap doubles each round)."""
    out = {}
    for r in range(1, int(distill["rounds"]) + 1):
        factor = int(distill["teacher_steps"]) ** r if distill["method"] == "sdtt" else 2**r
        k = int(distill["base_steps"]) // factor
        if k >= 1:
            out[k] = min(r * int(distill["refresh_every"]), int(train_steps))
    return out


def net_of(name: str) -> tuple[str, int | None]:
    """A net's (run, checkpoint step): '<run>@<step>' is a round's checkpoint of the run, any other name the
    run's newest (step None)."""
    run, _, step = name.partition("@")
    return run, int(step) if step else None


def settings(teacher_steps, few_steps, students=STUDENTS, variants=VARIANTS, rounds=None) -> list[dict]:
    """Every (teacher, model, steps) the run samples, in order: per teacher (of `students`) the teacher at
    teacher_steps and few_steps, then each of its students at few_steps (its newest checkpoint), all with the
    teacher's sampler, then, where rounds[student] = {k: checkpoint step} (round_students) names an earlier
    round's k-step student for a k of few_steps, that checkpoint at k (model and net '<student>@<step>',
    'round_of' the student), then the teacher's `variants` (other samplers of its network, 'net') at few_steps."""
    rounds = rounds or {}
    out = []
    for teacher, (label, fields) in TEACHERS.items():
        mine = [s for s in students if s[1] == teacher]
        if not mine:
            continue
        plan = [(teacher, k) for k in (*teacher_steps, *few_steps)] + [(s[0], k) for s in mine for k in few_steps]
        for model, steps in plan:
            out.append({"family": label, "teacher": teacher, "model": model, "net": model, "steps": int(steps),
                        "role": "teacher" if model == teacher else "student", "fields": {**fields, "steps": int(steps)}})  # fmt: skip
        for student, *_ in mine:
            found = rounds.get(student, {})
            final = max(found.values(), default=None)
            for k in few_steps:
                if k in found and found[k] != final:
                    name = f"{student}@{found[k]}"
                    out.append({"family": label, "teacher": teacher, "model": name, "net": name, "steps": int(k),
                                "role": "student", "round_of": student, "fields": {**fields, "steps": int(k)}})  # fmt: skip
        for name, extra in variants.get(teacher, ()):
            for k in few_steps:
                out.append({"family": label, "teacher": teacher, "model": name, "net": teacher, "steps": int(k),
                            "role": "variant", "fields": {**extra, "steps": int(k)}})  # fmt: skip
    return out


def run_seconds(workdir: str) -> float:
    """Wall seconds from the first to the last logged train step of a run (its metrics.jsonl), NaN without it."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return float("nan")
    times = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "train" and "time" in row:
                times.append(row["time"])
    return float(times[-1] - times[0]) if len(times) > 1 else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def make_sample(net, fields: dict):
    """sample(rng, x [B, L]) -> (tokens, nfe), jitted: the network's sampler of `fields`; prompt positions are
    kept (the uniform graph clamps them; the masked samplers keep every non-mask token)."""
    from ddlm.sampling import cli as sampling_cli

    sc = sampler_config.resolve(ml_collections.ConfigDict({"temperature": 1.0, "progress": False, **fields}))
    sample = sampling_cli.sample_fn(net.config, sc, net.model, net.tokenizer, None)
    mask_id = net.tokenizer.mask_id
    uniform = net.config.diffusion.process == "uniform"

    @jax.jit
    def run(params, rng, x):
        out = sample(params, rng, x, (x != mask_id) if uniform else None)
        return out.tokens, out.nfe

    return lambda rng, x: run(net.params, rng, x)


def draw(net, fields, prompt_ids, new_tokens, batch) -> tuple[np.ndarray, float]:
    run = make_sample(net, fields)
    rows, nfes = [], []
    for lo in range(0, len(prompt_ids), batch):
        x = sq.canvas(prompt_ids[lo : lo + batch], new_tokens, net.tokenizer.mask_id)
        tokens, nfe = run(jax.random.key(1000 + lo), x)
        rows.append(np.asarray(tokens))
        nfes.append(int(nfe))
    return np.concatenate(rows), float(np.mean(nfes))


def student_rounds(student: str, args) -> dict[int, int]:
    """round_students of a student's run, from the config stored in its newest checkpoint (--dry-run: from the
    recipe, experiments/few_step.py)."""
    if args.dry_run:
        from ddlm.eval import cli as eval_cli

        config = eval_cli.load_config_file(f"experiments/few_step.py:model={student.split('_')[0]}")
    else:
        from ddlm import checkpoints

        directory = os.path.join(workdir(args.root, student), checkpoints.CHECKPOINTS_DIR)
        with checkpoints.Checkpointer(directory, read_only=True) as checkpointer:
            _, stored = checkpointer.newest_metadata()
        config = ml_collections.ConfigDict((stored or {}).get("config", {}))
        if "distill" not in config:
            return {}
    return round_students(config.distill, config.train.steps)


def random_nets(names) -> dict:
    """--dry-run: random networks of the recipes' smoke shapes, at the training context of 128."""
    import flax.linen as nn

    from ddlm import models
    from ddlm.data import tokenizers
    from ddlm.eval import cli as eval_cli

    out = {}
    for i, name in enumerate(names):
        recipe = net_of(name)[0].split("_")[0]
        spec = "experiments/judge.py:smoke" if name == "judge" else f"experiments/few_step.py:model={recipe},smoke"
        config = eval_cli.load_config_file(spec)
        config.train.seq_len = 128
        tok = tokenizers.get_tokenizer(config.data)
        model = models.get_model(config.model, tok.vocab_size)
        x = jnp.zeros((1, 8), jnp.int32)
        t = jnp.zeros((1,)) if config.model.get("time_conditioning", False) else None
        params = dict(nn.unbox(jax.jit(model.init)(jax.random.key(i), x, t))["params"])
        params["output_kernel"] = jax.random.normal(jax.random.key(100 + i), params["output_kernel"].shape) * 0.5
        out[name] = sq.Net(config, model, params, tok)
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def report(rows, costs, students=STUDENTS) -> str:
    lines = []
    for teacher, (family, _) in TEACHERS.items():
        mine = [r for r in rows if r["teacher"] == teacher]
        if not mine:
            continue
        ref = reference_row(mine)
        lines.append(f"{family} (reference: {teacher} at {ref['steps']} steps; teacher training "
                     f"{costs.get(teacher, float('nan')) / 60:.1f} min)")  # fmt: skip
        lines.append("| model | steps | NFE | gen-ppl | entropy | MAUVE | gap to reference |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in mine:
            gap = r["gen_ppl"] - ref["gen_ppl"]
            lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']:.0f} | {sq.fmt(r['gen_ppl'], r['gen_ppl_se'])} | "
                         f"{sq.fmt(r['entropy'], r['entropy_se'], 3)} | {sq.fmt(r.get('mauve'), r.get('mauve_se'), 3)} | {gap:+.2f} |")  # fmt: skip
        for student, _, label in (s for s in students if s[1] == teacher):
            found = criteria(mine, teacher, student)
            if found:
                lines.append(f"  {student} ({label}; distillation {costs.get(student, float('nan')) / 60:.1f} min):")
            for k, c in found.items():
                lines.append(f"    {k} steps ({c['model']}): gap(student) / gap(teacher) = {sq.fmt(c['gap_ratio'], c['gap_ratio_se'])} "
                             f"(<= 0.5: {'yes' if c['half_gap'] else 'NO'}), entropy {100 * c['entropy_rel']:.1f}% from the "
                             f"reference's (<= {100 * ENTROPY_TOLERANCE:.0f}%: {'yes' if c['entropy_ok'] else 'NO'}) -> "
                             f"{'MET' if c['met'] else 'not met'}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def reference_row(rows) -> dict:
    teachers = [r for r in rows if r["role"] == "teacher"]
    return max(teachers, key=lambda r: r["steps"])


def student_row(rows, student, k):
    """The k-step student of a run: its round distilled for k steps if measured (settings' rounds), else its
    newest checkpoint at k; None if neither was."""
    for r in rows:
        if r.get("round_of") == student and r["steps"] == k:
            return r
    return next((r for r in rows if r["model"] == student and r["steps"] == k), None)


def criteria(rows, teacher, student, steps=CRITERION_STEPS) -> dict:
    """{k: criterion} at each k of `steps` with a teacher row and a student row (student_row: the round
    distilled for k steps where measured)."""
    ref = reference_row(rows)
    by = {(r["model"], r["steps"]): r for r in rows}
    out = {}
    for k in steps:
        row = student_row(rows, student, k)
        if row is not None and (teacher, k) in by:
            out[k] = {**criterion(row, by[(teacher, k)], ref), "model": row["model"]}
    return out


def plot(rows, out: str) -> None:
    """Top: gen-ppl and entropy against steps: each teacher's dashed curve, its students' solid curves (the
    earlier rounds' k-step students dash-dotted) and the many-step reference as a dotted line. Bottom, at each
    of CRITERION_STEPS: gen-ppl against entropy, one point per model (the k-step student for a student), the
    references as stars with the criterion's entropy band: a student better than its teacher at the same
    entropy lies below the line through the teacher's temperature-1 and temperature-0.9 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 10))
    axes = grid[0]
    palette = itertools.cycle(["tab:cyan", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:olive",
                               "tab:pink", "tab:gray", "gold", "navy", "lime"])  # fmt: skip
    colors = {"mdlm": "tab:blue", "duo": "tab:red"}
    for teacher in TEACHERS:
        mine = [r for r in rows if r["teacher"] == teacher]
        if not mine:
            continue
        ref = reference_row(mine)
        few = sorted({r["steps"] for r in mine if r["role"] == "student"})
        curve = lambda r: (r["round_of"], True) if r.get("round_of") else (r["model"], False)  # noqa: E731
        for model, rounds in dict.fromkeys(curve(r) for r in mine):
            color = colors.get(model) or colors.setdefault(model, next(palette))
            pts = sorted((r for r in mine if curve(r) == (model, rounds) and r["steps"] in few), key=lambda r: r["steps"])
            style = "-." if rounds else {"teacher": "--", "student": "-", "variant": ":"}[pts[0]["role"]]
            label = f"{model}, each k's round" if rounds else f"{model} ({ROLES[pts[0]['role']]})"
            for ax, key in zip(axes, ("gen_ppl", "entropy")):
                ax.errorbar([r["steps"] for r in pts], [r[key] for r in pts], yerr=[2 * r[f"{key}_se"] for r in pts],
                            fmt=("s" if rounds else "o") + style, color=color, capsize=2, label=label)  # fmt: skip
        for ax, key in zip(axes, ("gen_ppl", "entropy")):
            ax.axhline(ref[key], color=colors[teacher], ls=":", lw=1, label=f"{teacher} at {ref['steps']} steps")
    for ax, name in zip(axes, ("generative perplexity under the judge (±2 SE)", "unigram entropy (nats, ±2 SE)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (112 new characters)")
        ax.set_ylabel(name)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    for ax, k in zip(grid[1], CRITERION_STEPS):
        for teacher in TEACHERS:
            mine = [r for r in rows if r["teacher"] == teacher]
            if not mine:
                continue
            ref = reference_row(mine)
            ax.errorbar([ref["entropy"]], [ref["gen_ppl"]], xerr=[2 * ref["entropy_se"]], yerr=[2 * ref["gen_ppl_se"]],
                        fmt="*", ms=12, color=colors[teacher], label=f"{teacher} at {ref['steps']} steps")  # fmt: skip
            ax.axvspan(ref["entropy"] * (1 - ENTROPY_TOLERANCE), ref["entropy"] * (1 + ENTROPY_TOLERANCE),
                       color=colors[teacher], alpha=0.06)  # fmt: skip
            # The k-step rows: a student's k-step student, every other model's own row.
            at_k = [r for r in mine if r["steps"] == k and not r.get("round_of") and r is not ref]
            at_k = [student_row(mine, r["model"], k) if r["role"] == "student" else r for r in at_k]
            for r in at_k:
                name = r.get("round_of") or r["model"]
                ax.errorbar([r["entropy"]], [r["gen_ppl"]], xerr=[2 * r["entropy_se"]], yerr=[2 * r["gen_ppl_se"]],
                            fmt={"teacher": "o", "student": "s", "variant": "^"}[r["role"]], capsize=2,
                            color=colors.get(name, "black"), label=r["model"])  # fmt: skip
            sharpened = [r for r in at_k if r["role"] == "teacher" or r["fields"].get("temperature", 1.0) != 1.0
                         and r["fields"]["name"] == TEACHERS[teacher][1]["name"]]  # fmt: skip
            if len(sharpened) > 1:
                sharpened.sort(key=lambda r: r["entropy"])
                ax.plot([r["entropy"] for r in sharpened], [r["gen_ppl"] for r in sharpened], ":", color=colors[teacher])
        ax.set_yscale("log")
        ax.set_xlabel(f"unigram entropy at {k} steps (nats; band: the reference's ±{100 * ENTROPY_TOLERANCE:.0f}%)")
        ax.set_ylabel("generative perplexity (±2 SE)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128, help="judged samples per setting")
    parser.add_argument("--new_tokens", type=int, default=112, help="prompt (16) + this <= 128")
    parser.add_argument("--teacher_steps", default="256,1024", help="the teachers' many-step rows (the largest: the reference)")
    parser.add_argument("--few_steps", default="4,8,16,32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mauve_seeds", type=int, default=8, help="bootstrap resamples of MAUVE (its error bar)")
    parser.add_argument("--students", default="", help="comma-separated students (STUDENTS' names); default all")
    parser.add_argument("--final_only", action="store_true", help="no rows of the students' earlier rounds")
    parser.add_argument("--root", default="runs", help="the folder holding few_step/ and judge/")
    parser.add_argument("--out", default="benchmarks/few_step.png", help="the plot; the JSON goes beside it")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", help="random networks, tiny sizes")
    parser.add_argument("--from_json", default="", help="print the report of a written JSON (no sampling)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(saved["header"] + "\n\n" + report(saved["results"], saved["costs"], STUDENTS))
        if args.out != parser.get_default("out"):  # --from_json X --out Y.png: redraw the plot
            plot(saved["results"], args.out)
        return
    if args.dry_run:
        args.samples, args.new_tokens, args.teacher_steps, args.few_steps, args.mauve_seeds = 8, 32, "16", "4,8", 2
        args.batch = 8
        if args.out == parser.get_default("out"):
            args.out = "/tmp/few_step_dry_run.png"
    teacher_steps = [int(k) for k in args.teacher_steps.split(",")]
    few_steps = [int(k) for k in args.few_steps.split(",")]
    known = [s[0] for s in STUDENTS]
    chosen = args.students.split(",") if args.students else known
    if set(chosen) - set(known):
        sys.exit(f"few_step: --students={args.students}: expected some of {known}")
    students = [s for s in STUDENTS if s[0] in chosen]
    try:
        rounds = {} if args.final_only else {s[0]: student_rounds(s[0], args) for s in students}
    except CheckpointError as e:  # a student not trained (or its checkpoint unreadable): one line
        sys.exit(f"few_step: {e}")
    todo = settings(teacher_steps, few_steps, students, rounds=rounds)
    names = sorted({s["net"] for s in todo} | {"judge"})
    parsed = {n: net_of(n) for n in names}  # (run, checkpoint step or None)
    workdirs = {n: workdir(args.root, run) for n, (run, _) in parsed.items()}
    missing = [workdirs[n] for n in names if not args.dry_run and not os.path.isdir(os.path.join(workdirs[n], "checkpoints"))]
    if missing:
        sys.exit(f"few_step: no checkpoints in {', '.join(missing)}: train them first (experiments/few_step.py)")
    from ddlm import compilation_cache
    from ddlm.eval import cli as eval_cli
    from ddlm.eval import mauve as mauve_lib
    from ddlm.eval import sample_quality

    compilation_cache.enable()
    steps = {n: step for n, (_, step) in parsed.items() if step is not None}  # the rounds' checkpoints
    at = lambda n: workdirs[n] + (f" (step {steps[n]})" if n in steps else "")  # noqa: E731
    weights = "RANDOM weights (--dry-run)" if args.dry_run else "trained checkpoints " + ", ".join(at(n) for n in names)
    head = f"{machine.describe()}; {weights}; prompts {sq.PROMPT_TOKENS} tokens + {args.new_tokens} new, {args.samples} samples per setting"
    print(head, flush=True)
    nets = random_nets(names) if args.dry_run else sq.load_nets(names, workdirs, steps)
    judge_net = nets["judge"]
    scorer = eval_cli.make_scorer(judge_net.config, judge_net, batch_size=32)
    judge = mauve_lib.Judge.from_loaded(judge_net, batch_size=32)
    tok = nets[todo[0]["net"]].tokenizer
    held_out = eval_cli.validation_rows(nets[todo[0]["net"]].config, tok, args.samples)
    prompt_ids = sq.prompts(held_out, tok, args.samples)
    reference_features = judge.text_features([tok.decode(sample_quality.content_ids(r, tok)) for r in held_out])
    costs = {} if args.dry_run else {n: run_seconds(workdirs[n]) for n in names if n != "judge" and n not in steps}

    rows = []
    t_start = time.time()
    for s in todo:
        net = nets[s["net"]]
        t0 = time.perf_counter()
        tokens, nfe = draw(net, s["fields"], prompt_ids, args.new_tokens, args.batch)
        row = {**s, "nfe": nfe, **sample_quality.sample_quality(scorer, tokens.tolist(), net.tokenizer)}
        texts = [net.tokenizer.decode(sample_quality.content_ids(r, net.tokenizer)) for r in tokens.tolist()]
        row.update(sq.bootstrap_mauve(reference_features, judge.text_features(texts), args.mauve_seeds))
        row.update(seconds=time.perf_counter() - t0, example=texts[0])
        rows.append(row)
        print(f"{s['family']}: {s['model']} at {s['steps']} steps: gen-ppl {sq.fmt(row['gen_ppl'], row['gen_ppl_se'])}, "
              f"entropy {sq.fmt(row['entropy'], row['entropy_se'], 3)}, MAUVE {sq.fmt(row['mauve'], row['mauve_se'], 3)}, "
              f"NFE {nfe:.0f} [{time.time() - t_start:.0f} s]", flush=True)  # fmt: skip
    print("\n" + report(rows, costs, students))
    plot(rows, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"header": head, "costs": costs, "results": rows, "device": jax.devices()[0].device_kind}, f, indent=1, default=float)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json")


if __name__ == "__main__":
    main()
