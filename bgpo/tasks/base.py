"""A task = data source + prompt renderers + reward (docs/methods.md §6). Tasks know nothing of models.

Every task registers itself by name with ``@register_task("name")`` and implements ``Task``.
Two renderers share the same data: ``compact`` (the embedded tiny dLLM, character tokens) and
``d1`` (LLaDA-class instruct models, the d1 paper's reasoning/answer format).

Batches. A task may also define ``rewards(examples, completions, fmt) -> list[float]`` and
``scores(examples, completions, fmt) -> list[Score]`` (reward and correctness from ONE check of
each completion); the code tasks do, running their sandboxes in parallel. Callers use
``task_rewards`` / ``task_scores`` below, which fall back to ``reward`` / ``correct`` item by item.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

Format = Literal["compact", "d1"]
FORMATS: tuple[str, ...] = ("compact", "d1")


@dataclass(frozen=True)
class Example:
    """One problem. ``fields`` holds the task's own data (numbers, puzzle, question...);
    ``solution`` is a reference answer in the compact format (pretraining target), or None."""

    fields: dict[str, Any]
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training problems, deterministic in ``seed``, disjoint from the test set in use."""
        ...

    def test_examples(self) -> list[Example]:
        """The test set in use: the suite's own seeded set, or ``test_file`` when given."""
        ...

    def render(self, ex: Example, fmt: Format) -> str:
        """The prompt text (no chat template: the model adapter applies it)."""
        ...

    def target(self, ex: Example, fmt: Format) -> str:
        """A correct completion in ``fmt`` (for supervised pretraining)."""
        ...

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        """docs/methods.md §6 reward of a decoded completion (text after the prompt, EOS stripped)."""
        ...

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        """Accuracy criterion (full credit)."""
        ...


class Score(NamedTuple):
    """The reward of one completion and whether it counts as correct (accuracy)."""

    reward: float
    correct: bool


def task_rewards(task: Task, examples: Sequence[Example], completions: Sequence[str],
                 fmt: Format) -> list[float]:
    """Rewards of a batch: the task's own ``rewards`` when it has one, else ``reward`` per item."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    batched = getattr(task, "rewards", None)
    if batched is not None:
        return [float(r) for r in batched(examples, completions, fmt)]
    return [float(task.reward(ex, y, fmt)) for ex, y in zip(examples, completions, strict=True)]


def task_scores(task: Task, examples: Sequence[Example], completions: Sequence[str],
                fmt: Format) -> list[Score]:
    """Reward and correctness of a batch: the task's own ``scores`` when it has one (code tasks:
    each completion runs once), else ``reward`` and ``correct`` per item."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    batched = getattr(task, "scores", None)
    if batched is not None:
        return [Score(float(r), bool(c)) for r, c in batched(examples, completions, fmt)]
    return [Score(float(task.reward(ex, y, fmt)), bool(task.correct(ex, y, fmt)))
            for ex, y in zip(examples, completions, strict=True)]


SHOT_SEED = 1234  # the training problems a few-shot prompt shows (the same for every problem)


def prompt_text(task: Task, ex: Example, fmt: Format, shots: int = 0) -> str:
    """The prompt of ``ex``, after ``shots`` worked examples (prompt + reference completion, from
    the task's TRAINING problems, seed ``SHOT_SEED``, blank-line separated): the few-shot protocol
    some papers evaluate under (``task.shots``; 0 = the zero-shot prompt ``task.render`` gives)."""
    if shots <= 0:
        return task.render(ex, fmt)
    demos = task.train_examples(shots, SHOT_SEED)
    parts = [task.render(d, fmt) + task.target(d, fmt) for d in demos]
    return "\n\n".join([*parts, task.render(ex, fmt)])


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(cls: Callable[..., Task]) -> Callable[..., Task]:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task; unknown names fail naming the key and the allowed values."""
    if name not in _REGISTRY:
        raise ValueError(f"task.name={name!r} is not a registered task; allowed: {task_names()}")
    return _REGISTRY[name](**kwargs)


# ---- d1 format helpers shared by the tasks (docs/methods.md §6) ----

D1_INSTRUCTIONS = (
    "Work through the problem step by step inside <reasoning> </reasoning> tags, then give only the "
    "final answer inside <answer> </answer> tags, laid out as:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)

# The parsers of model output below run in time linear in their input (str.find / rfind scans
# and one backtracking-free regex), so a hostile completion of any length costs a single pass;
# tests/test_parsers.py feeds them 1 MB inputs.
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
_SPACES = re.compile(r"\s*")  # one greedy run, no backtracking: linear


def last_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` pair (stripped), or None when there is none.

    Pairs are read left to right, each ``<answer>`` closed by the first ``</answer>`` after it, so
    an ``<answer>`` inside a pair is content (``<answer>a<answer>b</answer>`` gives
    ``a<answer>b``), exactly as ``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1]``
    reads it, but in linear time: five ``str.find`` / ``rfind`` scans, no backtracking.
    """
    last_close = text.rfind(ANSWER_CLOSE)
    # the last opening tag before the last closing one lies inside (or opens) the last pair
    inner = text.rfind(ANSWER_OPEN, 0, last_close) if last_close >= 0 else -1
    if inner < 0:
        return None
    # that pair opens at the first opening tag after the closing tag before ``inner``
    prev_close = text.rfind(ANSWER_CLOSE, 0, inner)
    start = text.find(ANSWER_OPEN, prev_close + len(ANSWER_CLOSE) if prev_close >= 0 else 0)
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    return text[start + len(ANSWER_OPEN) : end].strip()


def d1_completion(reasoning: str, answer: str) -> str:
    """A completion in the d1 layout (used as the supervised ``target`` of d1-format tasks)."""
    return f"<reasoning>\n{reasoning.strip()}\n</reasoning>\n<answer>\n{answer.strip()}\n</answer>"


def check_format(fmt: str) -> None:
    """Fail on an unknown format, naming the allowed values."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not a task format; allowed: {list(FORMATS)}")


def has_d1_layout(text: str) -> bool:
    """True when ``text`` is exactly ``<reasoning>...</reasoning>`` then ``<answer>...</answer>``.

    Whitespace is allowed around the text and between the two parts, anything inside them (tags
    included): what ``re.match(r"^\\s*<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>\\s*$",
    text, re.DOTALL)`` accepts, in linear time.
    """
    s = text.strip()  # str.strip removes exactly the characters ``\s`` matches
    if not (s.startswith(REASONING_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    body = s[len(REASONING_OPEN) : len(s) - len(ANSWER_CLOSE)]  # the tags cannot overlap
    # any ``</reasoning>``, whitespace, ``<answer>`` inside ``body`` splits it into the two parts
    i = body.find(REASONING_CLOSE)
    while i >= 0:
        j = _SPACES.match(body, i + len(REASONING_CLOSE)).end()
        if body.startswith(ANSWER_OPEN, j):
            return True
        i = body.find(REASONING_CLOSE, j)
    return False
