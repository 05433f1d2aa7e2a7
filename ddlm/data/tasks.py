"""Synthetic problems with verifiable answers, generated locally, for SFT warm-starts and RL (ddlm/train/rl.py).

    task = tasks.get_task("addition", digits=3)
    problems = tasks.problems(task, "test", 500, seed=0)     # held-out, never trained on
    reward = task.reward(problems[0], completion_text)        # plain Python on decoded text, 1.0 or 0.0
    path = tasks.sft_records(task, data_config, n=20000)       # a .jsonl for config.data.sft_data

addition: two operands of exactly `digits` digits, prompt '123 456:' (the char tokenizer of the built-in
corpora has digits, space and ':' but no '+' or '='), answer their sum in decimal, '579'. The problem space
is split once and for all by a hash of the operands: about 10% of the pairs are 'test' (held-out
evaluation), the rest 'train' (the SFT records and the RL prompts are drawn from it only).

Rewards: `reward` = 1.0 for the exact answer (leading/trailing whitespace ignored), else 0.0; `format_ok`
says whether the completion is a plain number (a format reward a recipe may add).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

TASKS = ("addition",)
TEST_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    key: str  # what the split hashes


def _bucket(key: str) -> float:
    """A number in [0, 1) fixed by the key (sha256): the split does not depend on any seed."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


class Addition:
    """Sums of two `digits`-digit numbers."""

    name = "addition"

    def __init__(self, digits: int = 3):
        if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 9:
            raise ValueError(f"addition: digits must be an integer in [1, 9], got {digits!r}")
        self.digits = digits

    def draw(self, rng: np.random.Generator) -> Problem:
        low, high = 10 ** (self.digits - 1), 10**self.digits
        a, b = (int(x) for x in rng.integers(low, high, size=2))
        return Problem(prompt=f"{a} {b}:", answer=str(a + b), key=f"{a}+{b}")

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.digits + 2

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == problem.answer else 0.0

    @staticmethod
    def format_ok(completion: str) -> bool:
        return completion.strip().isdigit()


def get_task(name: str, **kwargs):
    if name == "addition":
        return Addition(**kwargs)
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")


def split_of(problem: Problem) -> str:
    return "test" if _bucket(problem.key) < TEST_FRACTION else "train"


def problems(task, split: str, n: int, seed: int) -> list[Problem]:
    """n problems of `split` ('train' | 'test'), drawn i.i.d. (with repeats) by a generator of `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = task.draw(rng)
        if split_of(p) == split:
            out.append(p)
    return out


def sft_records(task, data_config, n: int, seed: int = 0) -> str:
    """A .jsonl of n train-split problems as SFT records {"prompt", "response"} (the answer) under
    <data cache>/tasks/, written once (atomically) and reused; returns its path (config.data.sft_data)."""
    from ddlm.data import corpora

    name = f"{task.name}{getattr(task, 'digits', '')}_n{n}_seed{seed}.jsonl"
    path = os.path.join(corpora.cache_dir(data_config), "tasks", name)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with corpora.file_lock(path + ".lock"):
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for p in problems(task, "train", n, seed):
                    f.write(json.dumps({"prompt": p.prompt, "response": p.answer}) + "\n")
            os.replace(tmp, path)
    return path
