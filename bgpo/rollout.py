"""Prompts → completions → rewards: the rollout sampler wired to a task (docs/methods.md §1, §6).

Used by the RL trainer (sampled rollouts), by pretraining and by periodic evaluation (greedy).
Rewards go through the task's batch API (``bgpo.tasks.task_scores``): the code tasks run their
sandboxes in parallel, and each completion is checked ONCE for both its reward and correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bgpo.config import SamplerConf, TaskConfig
from bgpo.elbo import Batch
from bgpo.model import DLLM
from bgpo.sampler import SamplerConfig, generate
from bgpo.tasks import Example, Task, prompt_text, task_rewards, task_scores


@dataclass
class Rollouts:
    batch: Batch  # prompt + completion ids, G per prompt
    texts: list[str]  # decoded completions
    rewards: torch.Tensor  # [B] float
    correct: list[bool] | None = None  # [B] accuracy criterion, same check as the reward (eval_mode)


ORDERS = ("blocks", "left_to_right")


def sampler_config(task_cfg: TaskConfig, temperature: float, eval_mode: bool = False,
                   fast: SamplerConf | None = None, order: str = "blocks") -> SamplerConfig:
    """Rollouts use task.diffusion_steps (and the ``sampler.*`` mode); evaluation uses the
    reference sampler with one token per step (docs/methods.md §5), or ``fast``'s mode when given
    (``val_sampler``: validation only, never a test set). ``order="left_to_right"`` (a method's
    ``ROLLOUT_ORDER``, JustGRPO) decodes rollouts one token per step in blocks of one: exact
    autoregressive sampling with the future masked."""
    if order not in ORDERS:
        raise ValueError(f"rollout order {order!r} is not one of {list(ORDERS)}")
    fast = fast or SamplerConf()
    if eval_mode:  # one token per step; the reference sampler unless ``fast`` (validation) says otherwise
        return SamplerConfig(task_cfg.gen_length, task_cfg.block_length, task_cfg.gen_length, temperature,
                             fast.mode, fast.threshold, fast.cache)
    block, steps = task_cfg.block_length, task_cfg.diffusion_steps
    if order == "left_to_right":
        block, steps = 1, task_cfg.gen_length
    return SamplerConfig(task_cfg.gen_length, block, steps, temperature, fast.mode, fast.threshold,
                         fast.cache)


def rollout(model: DLLM, task: Task, examples: list[Example], task_cfg: TaskConfig, G: int,
            temperature: float, generator: torch.Generator | None = None,
            eval_mode: bool = False, fast: SamplerConf | None = None, order: str = "blocks") -> Rollouts:
    """G completions for each example (grouped, prompt-major), their rewards and the sampler's
    trace (``Batch.trace``: the step that committed each position)."""
    shots = getattr(task_cfg, "shots", 0) or 0
    texts = [prompt_text(task, ex, task_cfg.format, shots) for ex in examples for _ in range(G)]
    prompt_ids, prompt_mask = model.encode_prompts(texts)
    comp, trace = generate(model, prompt_ids, prompt_mask,
                           sampler_config(task_cfg, temperature, eval_mode, fast, order), generator,
                           return_trace=True)
    decoded = model.decode_completions(comp)
    flat = [ex for ex in examples for _ in range(G)]
    correct = None
    if eval_mode:  # accuracy too, from the same check of each completion
        scores = task_scores(task, flat, decoded, task_cfg.format)
        rewards, correct = [s.reward for s in scores], [s.correct for s in scores]
    else:
        rewards = task_rewards(task, flat, decoded, task_cfg.format)
    return Rollouts(Batch.build(prompt_ids, prompt_mask, comp, G, trace), decoded,
                    torch.tensor(rewards, dtype=torch.float64), correct)


@torch.no_grad()
def evaluate(model: DLLM, task: Task, examples: list[Example], task_cfg: TaskConfig,
             batch_size: int = 64, progress: bool = False, rank: int = 0, world: int = 1,
             gather: Callable[[list[Any]], list[Any]] | None = None,
             fast: SamplerConf | None = None) -> dict[str, Any]:
    """Greedy accuracy and mean reward on ``examples``, and both per problem (``per_problem``),
    with the reference sampler (``fast``: another mode, for validation: ``val_sampler``).
    Over several processes (``rank`` of ``world``; ``gather`` is ``Dist.gather``) each takes every
    ``world``-th batch of the one-process split and the batches are gathered in order: every rank
    returns exactly the one-process result, in about 1/world of its time."""
    if world > 1 and gather is None:
        raise ValueError("evaluate over several processes needs their gather")
    was_training = model.net.training
    model.net.eval()
    mine: list[tuple[int, list[float], list[float]]] = []  # (first problem, accuracy, reward) per batch
    starts = list(range(0, len(examples), batch_size))[rank::world]
    for lo in tqdm(starts, desc="eval", disable=not progress, leave=False):
        r = rollout(model, task, examples[lo : lo + batch_size], task_cfg, 1, 0.0, eval_mode=True, fast=fast)
        assert r.correct is not None  # eval_mode scores accuracy too
        mine.append((lo, [float(c) for c in r.correct], r.rewards.tolist()))
    model.net.train(was_training)
    parts = sorted(gather(mine) if gather is not None and world > 1 else mine)
    acc = [a for _, batch, _ in parts for a in batch]
    rew = [x for _, _, batch in parts for x in batch]
    n = max(len(examples), 1)
    return {"accuracy": sum(acc) / n, "reward": sum(rew) / n, "n": len(examples),
            "per_problem": {"accuracy": acc, "reward": rew}}
