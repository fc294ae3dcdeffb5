"""MATH500 (docs/methods.md §6): competition maths, scored on the final answer.

Data. Test: ``HuggingFaceH4/MATH-500`` (``test`` split; rows ``problem``, ``solution``,
``answer``), or a local JSON/JSONL/CSV/parquet file with the same columns (``test_source``, or ``test_file``).
Training: MATH train, named by ``train_source`` (a hub name or a local file with ``problem`` and
``solution``, optionally ``answer``; e.g. ``EleutherAI/hendrycks_math`` with ``train_config``); there
is no default, ``train_examples`` fails naming the argument. Training problems whose text is a
test problem are dropped. Everything is loaded on first use, never in the constructor.

Answers. The prediction is the last ``\\boxed{...}`` (brace-matched) inside the last
``<answer>...</answer>``, or that answer's whole content when it has no box; without answer tags,
the last ``\\boxed{}`` of the completion. ``normalize`` is light (spaces, ``\\left``/``\\right``,
``\\!`` and other spacing, ``^\\circ``, ``\\text{}``, ``dfrac``/``tfrac`` -> ``frac``, ``$``, a
trailing ``.``, then braces around the unbraced arguments of ``\\frac`` and ``\\sqrt``: ``\\frac12``,
``\\frac1{2}``, ``\\frac{1}2`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``); two answers match when
their normal forms are equal, or both parse as numbers (integers, decimals, ``a/b``,
``\\frac{a}{b}``) of equal value. Symbolic equivalence is not tested. Every step is linear in the
length of the completion (str.find / rfind scans, single-pass regexes).

Reward: 1.0 if correct else 0, plus ``format_bonus`` (default 0, i.e. off) when the completion
has the d1 layout, a small stand-in for d1's format terms.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from bgpo.tasks.base import (
    D1_INSTRUCTIONS,
    Example,
    Format,
    check_format,
    d1_completion,
    has_d1_layout,
    last_answer,
    register_task,
)
from bgpo.tasks.data import check_local_file, load_records, sample_pool


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched), or of the
    ``\\boxed 5`` form; None if there is none or its braces never close."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def extract_answer(completion: str) -> str | None:
    """The predicted final answer of a completion (see the module docstring)."""
    answer = last_answer(completion)
    if answer is not None:
        boxed = last_boxed(answer)
        return boxed if boxed is not None else answer
    return last_boxed(completion)


def normalize(ans: str) -> str:
    """Light normal form of a LaTeX answer (string comparison after this)."""
    s = ans.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\$", ""),
        ("$", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\\[!,;: ]", "", s)  # LaTeX spacing commands
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return brace_arguments(s)


# A TeX token that matters to ``brace_arguments``: ``\frac`` / ``\sqrt`` (also when letters follow,
# since ``normalize`` has removed the spaces that ended them), any other control sequence, a brace.
_TEX_TOKEN = re.compile(r"\\(?:frac|sqrt)|\\(?:[A-Za-z]+|.)|[{}]", re.DOTALL)
_N_ARGS = {"\\frac": 2, "\\sqrt": 1}


def brace_arguments(s: str) -> str:
    """Braces around the unbraced arguments of ``\\frac`` and ``\\sqrt`` in a normalised answer
    (TeX reads one token there: a character or a control sequence), so that ``\\frac12``,
    ``\\frac1{2}`` and ``\\frac{1}2`` all read ``\\frac{1}{2}``, ``\\sqrt2`` reads ``\\sqrt{2}`` and
    ``\\sqrt[3]2`` reads ``\\sqrt[3]{2}``. Text whose arguments are all braced is returned unchanged.
    Linear time: one tokenising pass (braces matched with a stack), then O(1) work per macro."""
    if "\\frac" not in s and "\\sqrt" not in s:
        return s
    token_end: dict[int, int] = {}  # start -> end of each control sequence
    group_end: dict[int, int] = {}  # position of a "{" -> one past its matching "}"
    macros: list[tuple[int, int]] = []  # (end of the macro's name, number of arguments)
    opened: list[int] = []
    for m in _TEX_TOKEN.finditer(s):
        tok = m.group()
        if tok == "{":
            opened.append(m.start())
        elif tok == "}":
            if opened:
                group_end[opened.pop()] = m.end()
        else:
            start, end = m.span()
            token_end[start] = end
            if tok in _N_ARGS:
                macros.append((end, _N_ARGS[tok]))
    wrap: dict[int, int] = {}  # start -> end of each argument token to put in braces (disjoint)
    bracket = -1  # the first "]" at or after the last optional argument looked at (len(s): none)
    for pos, n_args in macros:
        if n_args == 1 and s.startswith("[", pos):  # \sqrt[n]: skip the optional argument
            if bracket < pos:  # positions only grow, so these searches scan the text once in all
                found = s.find("]", pos)
                bracket = found if found >= 0 else len(s)
            pos = bracket + 1
        for _ in range(n_args):
            if pos >= len(s) or s[pos] == "}":
                break
            if s[pos] == "{":
                if pos not in group_end:
                    break
                pos = group_end[pos]
            else:
                end = token_end.get(pos, pos + 1)  # one token: a character or a control sequence
                wrap[pos] = end
                pos = end
    if not wrap:
        return s
    pieces: list[str] = []
    done = 0
    for start in sorted(wrap):
        pieces += (s[done:start], "{", s[start : wrap[start]], "}")
        done = wrap[start]
    pieces.append(s[done:])
    return "".join(pieces)


MAX_DIGITS = 4300  # Python's default cap on int() of a digit string (sys.int_info.default_max_str_digits)
_NON_DIGITS = re.compile(r"\D+")


def parse_number(text: str) -> Fraction:
    """``Fraction(text)``, refusing (ValueError) any run of more than ``MAX_DIGITS`` digits up front:
    ``int()`` refuses those under Python's default setting anyway, and this keeps the check linear
    in time whatever the interpreter's setting (converting a long digit run is not)."""
    if any(len(run) > MAX_DIGITS for run in _NON_DIGITS.split(text)):
        raise ValueError(f"a number with a run of more than {MAX_DIGITS} digits")
    return Fraction(text)


def to_number(s: str) -> Fraction | None:
    """Exact value of a normalised answer that is a plain number, ``a/b`` or ``\\frac{a}{b}``."""
    s = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or re.fullmatch(
        r"(-?)(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s
    )
    try:
        if m:
            den = parse_number(m.group(3))
            if den == 0:
                return None
            val = parse_number(m.group(2)) / den
            return -val if m.group(1) else val
        if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
            return parse_number(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(pred: str, ref: str) -> bool:
    """Equal normal forms, or equal numbers when both parse as numbers."""
    a, b = normalize(pred), normalize(ref)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and x == y


def _to_example(row: dict[str, Any], index: int, source: str) -> Example:
    answer = row.get("answer") or last_boxed(row["solution"]) or ""
    return Example(
        {"problem": row["problem"], "answer": str(answer)},
        row.get("solution"),
        {"source": source, "index": index, "unique_id": row.get("unique_id")},
    )


@register_task("math500")
class Math500Task:
    """docs/methods.md §6 MATH500; see the module docstring for the sources and the answer check."""

    DATA_FILES = ("test_file",)
    DATA_SOURCES = ("train_source", "test_source")
    name = "math500"

    def __init__(
        self,
        train_source: str | None = None,
        train_config: str | None = None,
        train_split: str = "train",
        test_source: str = "HuggingFaceH4/MATH-500",
        test_split: str = "test",
        n_test: int | None = None,
        format_bonus: float = 0.0,
        test_file: str | None = None,
    ) -> None:
        self.train_source, self.train_config, self.train_split = train_source, train_config, train_split
        if test_file:  # task.test_file (what the trainer passes): a local file replacing test_source
            check_local_file("test_file", test_file)
            test_source = test_file
        self.test_source, self.test_split, self.n_test = test_source, test_split, n_test
        self.format_bonus = format_bonus
        self._test: list[Example] | None = None
        self._train: list[Example] | None = None

    def test_examples(self) -> list[Example]:
        if self._test is None:
            rows = load_records(self.test_source, None, self.test_split, key="test_source")
            self._test = [_to_example(r, i, self.test_source) for i, r in enumerate(rows)][: self.n_test]
        return self._test

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` MATH training problems, sampled without replacement per pass, seeded."""
        if self.train_source is None:
            raise ValueError("math500 needs train_source (MATH train: a hub name or a local file)")
        if self._train is None:
            test_problems = {ex.fields["problem"].strip() for ex in self.test_examples()}
            rows = load_records(self.train_source, self.train_config, self.train_split, key="train_source")
            self._train = [
                _to_example(r, i, self.train_source)
                for i, r in enumerate(rows)
                if r["problem"].strip() not in test_problems
            ]
        return sample_pool(self._train, n, seed)

    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)  # compact == d1 for this GPU-scale task
        return (
            f"{ex.fields['problem']}\n"
            + D1_INSTRUCTIONS
            + "\nPut the final answer inside \\boxed{} within the answer tags."
        )

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        return d1_completion(ex.solution or ex.fields["answer"], f"\\boxed{{{ex.fields['answer']}}}")

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        pred = extract_answer(completion)
        return pred is not None and answers_match(pred, ex.fields["answer"])

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        check_format(fmt)
        bonus = self.format_bonus if self.format_bonus and has_d1_layout(completion) else 0.0
        return float(self.correct(ex, completion, fmt)) + bonus
