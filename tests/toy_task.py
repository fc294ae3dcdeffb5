"""A toy task for trainer tests: rewards that a random micro model's text already varies on.

Registered on import; subprocesses and Slurm jobs get it with ``BGPO_TASK_MODULES=tests.toy_task``.
"""

from __future__ import annotations

from bgpo.tasks import Example, register_task


@register_task("toy")
class ToyTask:
    """A reward that random micro-model text already varies on: the share of vowels."""

    name = "toy"

    def __init__(self, test_file=None, n_test=None):
        pass

    def train_examples(self, n, seed):
        return [Example({"i": (seed + i) % 7}) for i in range(n)]

    def test_examples(self):
        return self.train_examples(8, 99)

    def val_examples(self):
        return self.train_examples(8, 77)

    def render(self, ex, fmt):
        return f"{ex.fields['i']}|"

    def target(self, ex, fmt):
        return "aeiou"

    def reward(self, ex, completion, fmt):
        return sum(c in "aeiouAEIOU" for c in completion) / max(len(completion), 1)

    def correct(self, ex, completion, fmt):
        return self.reward(ex, completion, fmt) > 0.5
