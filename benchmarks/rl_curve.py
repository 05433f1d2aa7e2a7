"""RL on the local task: held-out accuracy after SFT alone vs after RL, the reward/accuracy curve, and where a
step's time goes (rollouts with the cached vs the uncached sampler, the reference, the update).

    nice -n 19 python benchmarks/rl_curve.py --sft=runs/sft_addition --rl=runs/rl_addition \\
        --png=benchmarks/rl_curve.png

Accuracy: both checkpoints (EMA parameters) complete the same --problems held-out problems of the test split
with the recipe's sampler and the same keys; the difference's standard error is paired (per problem) and
also given unpaired. Timing: one batch of the recipe (32 prompts x 8 completions), each part timed --repeats
times after a warm-up call, in interleaved rounds, all in this one process, so the ratios compare like with like on a shared
machine (the load average is printed beside them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddlm import loading  # noqa: E402
from ddlm.data import tasks  # noqa: E402
from ddlm.train import adapt, rl, trainer  # noqa: E402


def recipe(arg: str, sft: str):
    spec = importlib.util.spec_from_file_location("rl_addition", os.path.join(REPO, "experiments", "rl_addition.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.train.init_from = sft
    return config


def timing(config, repeats: int) -> dict:
    """Median seconds of one step's parts on one batch: rollouts with each sampler cache, the reference's
    estimate, the compiled update; measured in interleaved rounds (every part once a round), so a change of
    the machine's load during the run falls on all of them alike."""
    setup = trainer.build(config, jax.devices()[:1])
    params = adapt.load_init_params(config.train.init_from, setup.abstract_state().params, setup.tokenizer)
    # A copy in the state: the update donates it, and the rollouts go on reading `params`.
    state = setup.init_state().replace(params=jax.tree.map(jnp.copy, params))
    it = rl.RolloutIterator(setup, lambda: state, lambda: params)
    batch = next(it)
    x_init = rl.encode_prompts(
        setup.tokenizer,
        tasks.problems(rl.task_of(config), "train", config.train.batch_size // config.rl.group_size, seed=0),
        config.train.seq_len,
        config.rl.group_size,
    )[0]
    parts = {}
    key = jax.random.key(0)
    for cache in ("dual", "prefix", "none"):
        c = config.copy_and_resolve_references()
        c.sampler.cache = cache
        policy = rl.Policy(dataclasses.replace(setup, config=c), params)
        parts[f"rollout_{cache}_s"] = functools.partial(policy.sample, params, key, x_init)
    noise = np.asarray(batch["noise"])
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])
    parts["reference_s"] = lambda: policy.reference_units(tokens, mask, noise)
    compiled = trainer.compile_train_step(setup)
    holder = {"state": state}

    def update():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    parts["update_s"] = update
    for fn in parts.values():  # warm-up (compiles)
        jax.block_until_ready(fn())
    times = {k: [] for k in parts}
    for _ in range(repeats):
        for k, fn in parts.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def accuracy(config, sft: str, rl_dir: str, problems: int) -> dict:
    config.rl.eval_problems = problems
    setup = trainer.build(config, jax.devices()[:1])
    policy = rl.Policy(setup, None)
    sft_params = adapt.load_init_params(sft, setup.abstract_state().params, setup.tokenizer)
    rl_params = loading.load_for_inference(rl_dir, config, devices=jax.devices()[:1]).params
    r_sft, _ = rl.evaluate_rewards(setup, policy, sft_params)
    r_rl, _ = rl.evaluate_rewards(setup, policy, rl_params)
    n = len(r_sft)
    se = lambda r: math.sqrt(r.mean() * (1 - r.mean()) / n)
    diff = r_rl - r_sft
    return {
        "problems": n,
        "sft": float(r_sft.mean()),
        "sft_se": se(r_sft),
        "rl": float(r_rl.mean()),
        "rl_se": se(r_rl),
        "difference": float(diff.mean()),
        "difference_se_paired": float(diff.std(ddof=1) / math.sqrt(n)),
        "difference_se_unpaired": math.sqrt(se(r_sft) ** 2 + se(r_rl) ** 2),
    }


def curves(rl_dir: str) -> tuple[list, list]:
    train, evals = [], []
    with open(os.path.join(rl_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "train" and "reward" in row:
                train.append((row["step"], row["reward"]))
            elif row.get("split") == "eval" and "accuracy" in row:
                evals.append((row["step"], row["accuracy"], row["accuracy_se"]))
    return train, evals


def plot(png: str, train, evals, acc: dict, times: dict, load: float, config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        s, r = zip(*train)
        ax.plot(s, r, color="tab:blue", alpha=0.6, label="train reward (rollouts, logged mean)")
    if evals:
        s, a, e = zip(*evals)
        ax.errorbar(s, a, yerr=e, color="tab:red", marker="o", capsize=3, label="held-out accuracy (EMA)")
    ax.axhline(acc["sft"], color="gray", ls="--", label=f"SFT alone, {acc['problems']} problems: {acc['sft']:.3f} ± {acc['sft_se']:.3f}")
    ax.axhspan(acc["sft"] - acc["sft_se"], acc["sft"] + acc["sft_se"], color="gray", alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("exact-match accuracy / reward")
    ax.errorbar(
        [evals[-1][0] if evals else 0], [acc["rl"]], yerr=[acc["rl_se"]], color="black", marker="s", capsize=3,
        label=f"after RL, {acc['problems']} problems: {acc['rl']:.3f} ± {acc['rl_se']:.3f}",
    )
    rc = config.rl
    ax.set_title(f"{rc.digits}-digit addition: {rc.objective.upper()} ({rc.estimator} estimator) from SFT")
    ax.legend(fontsize=8, loc="lower right")
    labels = ["rollout\n(dual cache)", "rollout\n(prefix cache)", "rollout\n(no cache)", "reference\nestimate", "update"]
    keys = ["rollout_dual_s", "rollout_prefix_s", "rollout_none_s", "reference_s", "update_s"]
    bx.bar(labels, [1e3 * times[k] for k in keys], color=["tab:green", "tab:olive", "tab:orange", "tab:purple", "tab:blue"])
    bx.set_ylabel(f"ms per step ({config.train.batch_size} rows, median)")
    bx.tick_params(axis="x", labelsize=8)
    bx.set_title(f"where an RL step's time goes (2-core CPU, load {load:.1f})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", default="runs/sft_addition")
    parser.add_argument("--rl", default="runs/rl_addition")
    parser.add_argument("--arg", default="", help="the rl_addition recipe's arg the RL run used")
    parser.add_argument("--problems", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--png", default="benchmarks/rl_curve.png")
    args = parser.parse_args()
    config = recipe(args.arg, args.sft)
    acc = accuracy(config, args.sft, args.rl, args.problems)
    print(json.dumps(acc, indent=1))
    load = os.getloadavg()[0]
    times = timing(recipe(args.arg, args.sft), args.repeats)
    print(json.dumps(times, indent=1), f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    dual, none = times["rollout_dual_s"], times["rollout_none_s"]
    print(f"uncached / dual-cache rollout time: {none / dual:.2f}x; rollout (dual) / update: {dual / times['update_s']:.2f}x")
    train, evals = curves(args.rl)
    plot(args.png, train, evals, acc, times, load, config)
    print("wrote", args.png)


if __name__ == "__main__":
    main()
