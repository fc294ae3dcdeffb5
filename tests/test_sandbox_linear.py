"""The code extraction and the HumanEval job builder take time linear in a completion's length
(issue 23.3): each 1 MB hostile completion costs well under 2 s of CPU. The regexes they replace
took about 0.4 s at 20 kB ("```" + spaces, newlines) and grew with the square of the length
(about 20 minutes at 1 MB)."""

from __future__ import annotations

import time

import pytest

from bgpo.tasks.base import Example
from bgpo.tasks.humaneval import HumanEvalTask
from bgpo.tasks.mbpp import MBPPTask
from bgpo.tasks.sandbox import extract_code

MB = 1_000_000
HOSTILE = {
    "fence + spaces": "```" + " " * MB,
    "fence + spaces and tabs": "```" + " \t" * (MB // 2),
    "fence + tag + spaces": "```python" + " " * MB,
    "fence + tag + spaces + text": "```py" + " " * MB + "x",
    "fences, each with spaces": ("```" + " " * 100 + "x") * (MB // 104),
    "newlines": "\n" * MB,
    "fence + newlines": "```\n" * (MB // 4),
    "backticks": "`" * MB,
    "unclosed fence": "```\n" + "a" * MB,
    "answer tags": "<answer>" * (MB // 8),
    "answer pairs": "<answer>```\n</answer>" * (MB // 21),
    "def + spaces": "def" + " " * MB,
    "def f + spaces": "def f" + " " * MB,
    "lines of spaces": (" " * 999 + "\n") * (MB // 1000),
    "newline + spaces": "\n" + " " * MB,
    "def lines": "def f\n" * (MB // 6),
    "newlines then def": "\n" * MB + "def f(",
}
LIMIT_S = 2.0
EX = Example({"task_id": "T/0", "prompt": "def f(x):\n    '''x + 1'''\n", "entry_point": "f",
              "test": "def check(candidate):\n    assert candidate(1) == 2\n"})
MBPP_EX = Example({"task_id": 1, "text": "x + 1", "tests": ["assert f(1) == 2"], "setup": ""},
                  "def f(x):\n    return x + 1\n")


def cpu_seconds(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


@pytest.mark.parametrize("name", HOSTILE)
def test_parsers_are_linear_on_1mb(name):
    text = HOSTILE[name]
    assert len(text) >= MB - 200
    took = {"extract_code": cpu_seconds(extract_code, text),
            "humaneval job": cpu_seconds(HumanEvalTask().job, EX, text),
            "mbpp job": cpu_seconds(MBPPTask().job, MBPP_EX, text)}
    assert max(took.values()) < LIMIT_S, took


def test_the_fence_header_is_unchanged():
    """The linear header accepts what the old one did: spaces around an optional python/python3/py
    tag, any case; a fence with another tag is no python fence."""
    for header in ["```", "```python", "``` python ", "```\tpy\t", "```Python3", "```  ", "```PY "]:
        assert extract_code(f"text\n{header}\nx = 1\n```\nmore") == "x = 1\n", header
        assert extract_code(f"text\n{header}\nx = 2\n") == "x = 2\n", header  # an unclosed last fence
    assert extract_code("```js\nx = 1\n```") == "```js\nx = 1\n```"
    assert extract_code("```python x\nx = 1\n```") == "```python x\nx = 1\n```"
    assert extract_code("<answer>```python\na\n```</answer>```python\nb\n```") == "a\n"


def test_humaneval_still_finds_a_whole_function():
    """A completion that defines the entry point is taken whole (after the closed prompt); one that
    does not continues the prompt as its body."""
    task = HumanEvalTask()
    whole = task.job(EX, "```python\ndef f(x):\n    return x + 1\n```")
    assert whole.program.startswith(EX.fields["prompt"].rstrip() + "\n    pass\n")
    indented = task.job(EX, "class A:\n    def f (self):\n        pass\n")
    assert indented.program.startswith(EX.fields["prompt"].rstrip() + "\n    pass\n")
    body = task.job(EX, "    return x + 1\n")
    assert body.program == EX.fields["prompt"] + "    return x + 1\n\n"
    comment = "    y = 1  # def f(x) is not at a line start\n"
    assert task.job(EX, comment).program == EX.fields["prompt"] + comment + "\n"
