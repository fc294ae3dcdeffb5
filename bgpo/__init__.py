"""bgpo-suite as a library: the pieces of the RL loop, to use in your own (README, "Python API").

    from bgpo import BGPO, BGPOConfig, advantages, build_tiny, get_task, sample_rollouts, TaskConfig

- models: ``load_dllm`` (tiny / LLaDA / Dream behind one ``DLLM`` interface), ``build_tiny``;
- the rollout sampler: ``generate`` + ``SamplerConfig`` (LLaDA's low-confidence remasking),
  ``sample_rollouts`` (= ``bgpo.rollout.rollout``: prompts → completions → the task's rewards, as
  a ``Batch``; not ``rollout``, which is the submodule's name);
- the ELBO sampler: ``elbo`` (``draw``, ``ell``, ``Draws``), ``ELBOConfig``, ``Batch``;
- the objectives — each RETURNS the loss of a chunk of MC samples (``method.chunks`` names them,
  ``method.loss(...)`` gives ``(loss, stats)``; backward per chunk keeps BGPO's memory flat):
  ``BGPO``, ``VRPO``, ``DiffuGRPO``, ``WD1``, ``SPG``, ``ESPO``, ``CoupledGRPO``, ``TraceRL``,
  ``JustGRPO`` and their ``...Config`` dataclasses; ``advantages`` (group-relative, BGPO §3);
- tasks and rewards: ``get_task``, ``task_rewards``, ``task_scores``, ``register_task``, ``TaskConfig``;
- the whole loop from Python: ``train_policy(model, reward_funcs, prompts, method=...)`` — plain
  reward functions ``(prompts, completions) -> list[float]``, TRL-style, through the suite's one
  trainer and results store (``bgpo.api``).

Names are imported on first use (PEP 562), so ``import bgpo.tasks`` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str | tuple[str, str]] = {
    "DLLM": "bgpo.model", "load_dllm": "bgpo.model", "build_tiny": "bgpo.model", "apply_lora": "bgpo.model",
    "generate": "bgpo.sampler", "SamplerConfig": "bgpo.sampler",
    "sample_rollouts": ("bgpo.rollout", "rollout"), "Rollouts": "bgpo.rollout",
    "ELBOConfig": "bgpo.elbo", "Batch": "bgpo.elbo", "Draws": "bgpo.elbo",
    "Prepared": "bgpo.method", "backward": "bgpo.method", "clipped": "bgpo.method", "k3": "bgpo.method",
    "advantages": "bgpo.update", "train_policy": "bgpo.api", "RewardTask": "bgpo.api",
    "BGPO": "bgpo.objective", "BGPOConfig": "bgpo.objective",
    "VRPO": "baselines.vrpo", "VRPOConfig": "baselines.vrpo",
    "DiffuGRPO": "baselines.diffu_grpo", "DiffuGRPOConfig": "baselines.diffu_grpo",
    "WD1": "baselines.wd1", "WD1Config": "baselines.wd1",
    "SPG": "baselines.spg", "SPGConfig": "baselines.spg",
    "ESPO": "baselines.espo", "ESPOConfig": "baselines.espo",
    "CoupledGRPO": "baselines.coupled_grpo", "CoupledGRPOConfig": "baselines.coupled_grpo",
    "TraceRL": "baselines.tracerl", "TraceRLConfig": "baselines.tracerl",
    "JustGRPO": "baselines.just_grpo", "JustGRPOConfig": "baselines.just_grpo",
    "get_task": "bgpo.tasks", "task_rewards": "bgpo.tasks", "task_scores": "bgpo.tasks",
    "register_task": "bgpo.tasks", "Example": "bgpo.tasks",
    "TaskConfig": "bgpo.config",
}
_MODULES = ("elbo",)  # submodules exported as such: ``from bgpo import elbo``

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(module), attr)
    if name in _MODULES:
        return importlib.import_module(f"bgpo.{name}")
    raise AttributeError(f"module 'bgpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
