"""Train from Python with plain reward functions, TRL-style, through the suite's one loop:

    from bgpo import train_policy

    def brevity(prompts: list[str], completions: list[str]) -> list[float]:
        return [1.0 / (1 + len(c)) for c in completions]

    summary = train_policy("path/to/model", [brevity], prompts, method="bgpo", results_dir="runs",
                           overrides=["steps=60", "mc=8"])

The prompts become a task (``RewardTask``): the training prompts are drawn from ``prompts``; the
validation and test problems are ``eval_prompts`` (or, without them, the last tenth of ``prompts``,
held out from training). The reward of a completion is the sum of the reward functions' values
(each called once per batch as ``f(prompts, completions)``); it counts as correct when that sum is
at least ``correct_at``. The run then goes through ``bgpo.train.run`` — the same validation,
results store, checkpoints, trainer and summary as ``python -m bgpo.train``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bgpo.tasks import Example, register_task
from bgpo.tasks.base import _REGISTRY

RewardFunc = Callable[[list[str], list[str]], Sequence[float]]


class RewardTask:
    """A task made of prompts and reward functions (``Task`` protocol, docs/methods.md §6)."""

    ANY_BASE_MODEL = True  # no base model of its own: any model folder may start it

    def __init__(self, name: str, prompts: Sequence[str], eval_prompts: Sequence[str],
                 reward_funcs: Sequence[RewardFunc], correct_at: float) -> None:
        self.name, self.prompts, self.eval_prompts = name, list(prompts), list(eval_prompts)
        self.reward_funcs, self.correct_at = list(reward_funcs), correct_at

    def __call__(self, test_file: str | None = None, n_test: int | None = None) -> RewardTask:
        return self  # the registry calls a task's constructor with the task's config

    def train_examples(self, n: int, seed: int) -> list[Example]:
        rng, out = random.Random(seed), []
        while len(out) < n:  # epochs over the training prompts, each shuffled
            order = list(self.prompts)
            rng.shuffle(order)
            out += [Example({"prompt": p}) for p in order]
        return out[:n]

    def val_examples(self) -> list[Example]:
        return [Example({"prompt": p}) for p in self.eval_prompts]

    def test_examples(self) -> list[Example]:
        return self.val_examples()

    def render(self, ex: Example, fmt: str) -> str:
        return ex.fields["prompt"]

    def target(self, ex: Example, fmt: str) -> str:
        raise NotImplementedError("a task of reward functions has no reference answers to pretrain on")

    def rewards(self, examples: Sequence[Example], completions: Sequence[str], fmt: str) -> list[float]:
        prompts, comps = [ex.fields["prompt"] for ex in examples], list(completions)
        total = [0.0] * len(comps)
        for f in self.reward_funcs:
            values = list(f(prompts, comps))
            if len(values) != len(comps):
                raise ValueError(f"reward function {getattr(f, '__name__', f)!r} returned {len(values)} "
                                 f"values for {len(comps)} completions")
            total = [t + float(v) for t, v in zip(total, values, strict=True)]
        return total

    def reward(self, ex: Example, completion: str, fmt: str) -> float:
        return self.rewards([ex], [completion], fmt)[0]

    def correct(self, ex: Example, completion: str, fmt: str) -> bool:
        return self.reward(ex, completion, fmt) >= self.correct_at


def reward_task(prompts: Sequence[str], reward_funcs: Sequence[RewardFunc],
                eval_prompts: Sequence[str] | None = None, correct_at: float = 1.0) -> RewardTask:
    """Register the task of ``prompts`` and ``reward_funcs`` under a name derived from them (so the
    run key tells different prompt sets and rewards apart) and return it."""
    prompts = [str(p) for p in prompts]
    if not prompts or not reward_funcs:
        raise ValueError("train_policy needs at least one prompt and one reward function")
    if eval_prompts is None:
        held = max(1, len(prompts) // 10)
        prompts, eval_prompts = prompts[:-held] or prompts, prompts[-held:]
    ident = hashlib.sha256("\x1f".join([*prompts, "\x1e", *eval_prompts, "\x1e",
                                         *(getattr(f, "__qualname__", repr(f)) for f in reward_funcs),
                                         str(correct_at)]).encode()).hexdigest()[:10]
    name = f"rewards-{ident}"
    task = RewardTask(name, prompts, [str(p) for p in eval_prompts], reward_funcs, correct_at)
    if name not in _REGISTRY:
        register_task(name)(task)
    else:
        _REGISTRY[name] = task  # the same prompts and names: the new functions' bodies win
    return task


def train_policy(model: str | Path, reward_funcs: Sequence[RewardFunc], prompts: Sequence[str], *,
                 method: str = "bgpo", eval_prompts: Sequence[str] | None = None, correct_at: float = 1.0,
                 results_dir: str | Path = "runs", model_group: str = "tiny",
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``model`` (a model folder: a tiny base, or a LLaDA/Dream folder with
    ``model_group=llada_8b_instruct|dream_7b``) with ``method`` on ``prompts`` and the summed
    rewards of ``reward_funcs``; ``overrides`` are the command line's (``steps=60``, ``mc=8``, ...).
    Returns the run's summary (``summary["run"]`` is its folder under ``results_dir``)."""
    from hydra import compose, initialize_config_module

    from bgpo.config import register
    from bgpo.train import run

    task = reward_task(prompts, reward_funcs, eval_prompts, correct_at)
    register()
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", f"model={model_group}", f"model.path={model}",
                                          f"task.name={task.name}", f"results_dir={results_dir}", *overrides])
    return run(cfg)
