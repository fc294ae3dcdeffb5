"""Parsers of model output: linear time on 1 MB hostile completions, the same answers as before on
everything else, and ``\\frac12`` read as ``\\frac{1}{2}`` (MATH answer normalisation)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import pytest

from bgpo.tasks.arith import try_evaluate
from bgpo.tasks.base import Example, Task, has_d1_layout, last_answer, task_scores
from bgpo.tasks.countdown import CountdownTask
from bgpo.tasks.gsm8k import GSM8KTask, last_number, same_number
from bgpo.tasks.gsm8k import extract_answer as gsm8k_answer
from bgpo.tasks.math500 import (
    Math500Task,
    answers_match,
    brace_arguments,
    last_boxed,
    normalize,
    to_number,
)
from bgpo.tasks.math500 import extract_answer as math_answer
from bgpo.tasks.math_mix import MathTask
from bgpo.tasks.sudoku import SudokuTask

# The regexes the two tag parsers used before they became linear: the oracle they must agree with.
OLD_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
OLD_LAYOUT_RE = re.compile(r"^\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def old_last_answer(text: str) -> str | None:
    found = OLD_ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


# ---- the tag parsers agree with the old regexes ----
def test_tag_parsers_agree_with_the_old_regexes() -> None:
    pieces = [
        "<answer>",
        "</answer>",
        "<reasoning>",
        "</reasoning>",
        "<answer",
        "answer>",
        "</",
        "<",
        ">",
        "a",
        "7",
        " ",
        "\n",
        "\t",
        "\u00a0",
        "\u2003",
    ]
    rng = random.Random(0)
    texts = [
        "",
        "<answer>1</answer> x <answer> 2 </answer>",
        "<answer>a<answer>b</answer>",
        "<answer>a</answer></answer>",
        "</answer><answer>b</answer><answer>c",
        " \n<reasoning>r</reasoning>\n\n<answer>\n5\n</answer>\n ",
        "<reasoning></reasoning><answer></answer>",
        "<reasoning></answer>",
        "<reasoning>a</reasoning> x </reasoning> <answer>b</answer>",
        "<reasoning>a</reasoning><answer>b</answer> tail",
    ]
    texts += ["".join(rng.choices(pieces, k=rng.randint(1, 12))) for _ in range(20_000)]
    for text in texts:
        assert last_answer(text) == old_last_answer(text), text
        assert has_d1_layout(text) == (OLD_LAYOUT_RE.match(text) is not None), text


# ---- normal completions score as before ----
GSM8K_EX = Example({"question": "q", "answer": "18"})
MATH_EX = Example({"problem": "p", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"})
MATH_NUM_EX = Example({"problem": "p", "answer": "\\frac{1}{2}"})
COUNTDOWN_EX = Example({"numbers": [30, 100, 93], "target": 37}, "100-93+30")
SUDOKU_EX = Example({"puzzle": "1030020130104003"}, "1234342121434312")

# (task, example, d1 completion, its reward before the parsers became linear; format_bonus 0.1)
SCORED_BEFORE = [
    (
        "gsm8k",
        GSM8K_EX,
        "<reasoning>\n16 - 3 - 4 = 9, 9 * 2 = 18\n</reasoning>\n<answer>\n18\n</answer>",
        1.1,
    ),
    ("gsm8k", GSM8K_EX, "<reasoning>r</reasoning>\n<answer>\n\\boxed{18}\n</answer>\n", 1.1),
    ("gsm8k", GSM8K_EX, "<reasoning>so $18</reasoning><answer>$18.00</answer>", 1.1),
    ("gsm8k", GSM8K_EX, "The answer is 18.", 1.0),
    ("gsm8k", GSM8K_EX, "<reasoning>r</reasoning>\n<answer>17</answer>", 0.1),
    ("gsm8k", GSM8K_EX, "<reasoning>r</reasoning>\n<answer>1,018</answer>", 0.1),
    ("gsm8k", GSM8K_EX, "<answer>18</answer> then <answer>19</answer>", 0.0),
    ("gsm8k", GSM8K_EX, "<reasoning>a</reasoning> text <answer>18</answer>", 1.0),
    ("gsm8k", GSM8K_EX, "<reasoning>a 18</reasoning>\n<answer>17", 0.0),
    ("gsm8k", GSM8K_EX, "", 0.0),
    ("math500", MATH_EX, "<reasoning>r</reasoning>\n<answer>\n\\boxed{(3, \\frac{\\pi}{2})}\n</answer>", 1.1),
    ("math500", MATH_EX, "<reasoning>r</reasoning><answer>\\left(3,\\dfrac{\\pi}{2}\\right)</answer>", 1.1),
    ("math500", MATH_EX, "so \\boxed{(3, \\frac{\\pi}{2})}", 1.0),
    ("math500", MATH_EX, "<reasoning>r</reasoning><answer>\\boxed{(3, \\pi)}</answer>", 0.1),
    ("math500", MATH_NUM_EX, "<reasoning>r</reasoning>\n<answer>\n\\boxed{0.5}\n</answer>", 1.1),
    ("math500", MATH_NUM_EX, "<reasoning>r</reasoning>\n<answer>1/2</answer>", 1.1),
    ("math500", MATH_NUM_EX, "<reasoning>r</reasoning>\n<answer>\\boxed{\\tfrac{1}{2}}.</answer>", 1.1),
    ("math500", MATH_NUM_EX, "<reasoning>r</reasoning>\n<answer>\\boxed{\\frac{2}{3}}</answer>", 0.1),
    ("math500", MATH_NUM_EX, "<answer>\\boxed{\\frac{1}{2}</answer>", 0.0),
    (
        "countdown",
        COUNTDOWN_EX,
        "<reasoning>100-93=7, 7+30=37</reasoning>\n<answer>(100-93)+30</answer>",
        1.0,
    ),
    ("countdown", COUNTDOWN_EX, "<reasoning>r</reasoning>\n<answer> 100 - 93 + 30 </answer>", 1.0),
    ("countdown", COUNTDOWN_EX, "<reasoning>r</reasoning>\n<answer>100+93-30</answer>", 0.1),
    ("countdown", COUNTDOWN_EX, "<reasoning>r</reasoning>\n<answer>100-93+30=37</answer>", 0.0),
    ("countdown", COUNTDOWN_EX, "<answer>1</answer><answer>100-93+30</answer>", 1.0),
    ("sudoku", SUDOKU_EX, "<reasoning>r</reasoning>\n<answer>\n1234\n3421\n2143\n4312\n</answer>", 1.0),
    ("sudoku", SUDOKU_EX, "<reasoning>r</reasoning>\n<answer>1234342121431112</answer>", 0.875),
    ("sudoku", SUDOKU_EX, "<reasoning>r</reasoning>\n<answer>12343421</answer>", 0.5),
    ("sudoku", SUDOKU_EX, "<reasoning>r</reasoning>\n1234342121434312", 0.0),
]


def _task(name: str) -> Task:
    if name == "gsm8k":
        return GSM8KTask(format_bonus=0.1)
    if name == "math500":
        return Math500Task(format_bonus=0.1)
    return CountdownTask() if name == "countdown" else SudokuTask()


@pytest.mark.parametrize(
    ("name", "ex", "completion", "reward_before"),
    [(n, e, c, r) for n, e, c, r in SCORED_BEFORE],
    ids=[f"{n}-{i}" for i, (n, *_) in enumerate(SCORED_BEFORE)],
)
def test_normal_completions_score_as_before(
    name: str, ex: Example, completion: str, reward_before: float
) -> None:
    task = _task(name)
    assert task.reward(ex, completion, "d1") == pytest.approx(reward_before)


# normalize's output before the \frac / \sqrt change, on answers whose arguments are braced
NORMAL_FORMS_BEFORE = [
    ("1", "1"),
    ("\\frac{1}{6}", "\\frac{1}{6}"),
    ("90^\\circ", "90"),
    ("\\left( -2, 2 \\right)", "(-2,2)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("p - q", "p-q"),
    ("\\text{Evelyn}", "Evelyn"),
    ("3\\sqrt{13}", "3\\sqrt{13}"),
    ("x^2+7x+10", "x^2+7x+10"),
    ("\\text{(C)}", "(C)"),
    ("6 - 5i", "6-5i"),
    ("[-2,7]", "[-2,7]"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{3}"),
    ("0.5", "0.5"),
    ("1,000", "1,000"),
    ("\\$18.90", "18.90"),
    ("10\\%", "10\\%"),
    ("\\pi", "\\pi"),
    ("-\\frac{1}{2}", "-\\frac{1}{2}"),
    ("\\dfrac{9}{7}", "\\frac{9}{7}"),
    ("4\\sqrt{2}", "4\\sqrt{2}"),
    ("\\sqrt[3]{4}", "\\sqrt[3]{4}"),
    ("(-\\infty, 1)", "(-\\infty,1)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\2\\end{pmatrix}"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("5.", "5"),
    ("3\\!000", "3000"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("1/2", "1/2"),
    ("2/4", "2/4"),
    ("\\mbox{ cm}^2", "cm^2"),
    ("\\textbf{(E)}", "(E)"),
    ("\\frac{-3}{4}", "\\frac{-3}{4}"),
    ("-0.75", "-0.75"),
    ("1,234.5", "1,234.5"),
    ("\\{1, 2\\}", "\\{1,2\\}"),
    ("\\frac{x+1}{x-1}", "\\frac{x+1}{x-1}"),
    ("\\sqrt{2}/2", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("2\\pi", "2\\pi"),
]
# the pairs of those answers that matched before (and no other pair did)
MATCHED_BEFORE = {
    ("0.5", "\\frac{1}{2}"),
    ("0.5", "1/2"),
    ("0.5", "2/4"),
    ("\\frac{1}{2}", "1/2"),
    ("\\frac{1}{2}", "2/4"),
    ("1/2", "2/4"),
    ("\\frac{-3}{4}", "-0.75"),
}


def test_math_normal_forms_and_matches_as_before() -> None:
    for answer, normal in NORMAL_FORMS_BEFORE:
        assert normalize(answer) == normal, answer
        assert brace_arguments(normal) == normal  # nothing to brace: unchanged
    answers = [a for a, _ in NORMAL_FORMS_BEFORE]
    matched = {(a, b) for i, a in enumerate(answers) for b in answers[i + 1 :] if answers_match(a, b)}
    assert matched == MATCHED_BEFORE


def test_gsm8k_and_number_parsers_as_before() -> None:
    assert last_number("a 1,234 b 5,67 c") == "67" and last_number("1.2.3") == "3"
    assert gsm8k_answer("<answer>\\boxed{-7.5}</answer> 3") == "-7.5"
    assert same_number("18.0", "18") and not same_number("18.5", "18") and not same_number(None, "1")
    assert to_number("\\frac{-3}{4}") == to_number("-0.75") and to_number("1,234.5") is not None
    # digit runs beyond Python's default int() cap (4300) were refused before; still are, up front
    assert not same_number("9" * 5000, "9" * 5000) and to_number("1." + "0" * 5000) is None
    assert to_number("9" * 4300) == int("9" * 4300)


# ---- \frac12 == \frac{1}{2} ----
def test_frac_and_sqrt_arguments_are_braced() -> None:
    for written in ("\\frac12", "\\frac1{2}", "\\frac{1}2", "\\dfrac12", "\\tfrac 1 2", "\\frac 1 2"):
        assert normalize(written) == "\\frac{1}{2}", written
        assert answers_match(written, "\\frac{1}{2}") and answers_match(written, "0.5")
    assert math_answer("<answer>\\boxed{\\frac12}</answer>") == "\\frac12"
    assert (
        Math500Task().reward(MATH_NUM_EX, "<reasoning>r</reasoning><answer>\\boxed{\\frac12}</answer>", "d1")
        == 1
    )
    assert normalize("-\\frac34") == "-\\frac{3}{4}" and answers_match("-\\frac34", "-0.75")
    assert (
        normalize("\\frac\\pi2") == "\\frac{\\pi}{2}"
        and normalize("\\frac{\\frac12}3") == "\\frac{\\frac{1}{2}}{3}"
    )
    assert normalize("\\frac123") == "\\frac{1}{2}3"  # TeX reads one token per argument
    assert normalize("\\sqrt2") == "\\sqrt{2}" and answers_match("3\\sqrt2", "3\\sqrt{2}")
    assert normalize("\\sqrt[3]2") == "\\sqrt[3]{2}" and answers_match(
        "\\frac{\\sqrt3}3", "\\frac{\\sqrt{3}}{3}"
    )
    assert not answers_match("\\frac12", "\\frac21") and not answers_match("\\sqrt2", "\\sqrt3")
    # malformed or escaped: left alone
    for text in ("\\frac", "\\frac{1", "\\sqrt[3", "\\frac}", "\\\\frac12", "a\\cfrac12"):
        assert brace_arguments(text) == text, text


def test_brace_arguments_is_idempotent() -> None:
    pieces = ["\\frac", "\\sqrt", "\\pi", "\\\\", "\\{", "1", "2", "a", "{", "}", "[", "]"]
    rng = random.Random(1)
    for _ in range(5000):
        text = "".join(rng.choices(pieces, k=rng.randint(1, 10)))
        once = brace_arguments(text)
        assert brace_arguments(once) == once, text
        assert once.replace("{", "").replace("}", "") == text.replace("{", "").replace("}", "")


# ---- linear time: 1 MB hostile completions ----
MB = 1 << 20
BOUND_S = 2.0  # CPU seconds per call at 1 MB; the quadratic last_answer took 2.7 s at 64 KB, ~11 min at 1 MB


def _fill(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


# each a prefix, a unit repeated to fill the length asked for, and a suffix
HOSTILE: dict[str, tuple[str, str, str]] = {
    "answer-open": ("", "<answer>", ""),
    "answer-close": ("", "</answer>", ""),
    "answer-open-boxed": ("", "<answer>\\boxed{", ""),
    "reasoning-open": ("", "<reasoning>", ""),
    "layout-near-miss": ("<reasoning>", "</reasoning> <answer></answer> x", ""),
    "layout-pairs": ("", "<reasoning></reasoning><answer></answer>", ""),
    "boxed-braces": ("<answer>\\boxed", "{", ""),
    "boxes": ("", "\\boxed{", ""),
    "boxed-space": ("\\boxed", " ", ""),
    "digits": ("", "9", ""),
    "number-chain": ("", "1,234.5", ""),
    "signs": ("", "-1/", ""),
    "frac-bare": ("<answer>", "\\frac12", ""),
    "frac-open": ("\\boxed{", "\\frac{", ""),
    "frac-sqrt": ("", "\\frac{\\sqrt", ""),
    "sqrt-optional": ("", "\\sqrt[", ""),
    "text-open": ("", "\\text{a", ""),
    "spacing": ("", " \\, \\!", ""),
    "whitespace": ("", " \n\t", ""),
    "parens": ("", "((", ""),
    "answer-frac-closed": ("<reasoning>r</reasoning><answer>", "\\frac12", "</answer>"),
    "boxed-digits-closed": ("<answer>\\boxed{", "9", "}</answer>"),
}
_MATH_TASK = MathTask(math_train="unused")
PARSERS: dict[str, Callable[[str], object]] = {
    "last_answer": last_answer,
    "has_d1_layout": has_d1_layout,
    "math500.last_boxed": last_boxed,
    "math500.extract_answer": math_answer,
    "math500.normalize": normalize,
    "math500.to_number": to_number,
    "math500.answers_match": lambda s: answers_match(s, s[::-1]),
    "math500.reward": lambda s: Math500Task(format_bonus=0.1).reward(MATH_NUM_EX, s, "d1"),
    "math.reward": lambda s: _MATH_TASK.reward(MATH_NUM_EX, s, "d1"),
    "gsm8k.last_number": last_number,
    "gsm8k.extract_answer": gsm8k_answer,
    "gsm8k.same_number": lambda s: same_number(s, "18"),
    "gsm8k.reward": lambda s: GSM8KTask(format_bonus=0.1).reward(GSM8K_EX, s, "d1"),
    "arith.try_evaluate": try_evaluate,
    "countdown.scores": lambda s: (
        task_scores(CountdownTask(), [COUNTDOWN_EX] * 2, [s, s], "d1")
        + task_scores(CountdownTask(), [COUNTDOWN_EX], [s], "compact")
    ),
    "sudoku.scores": lambda s: (
        task_scores(SudokuTask(), [SUDOKU_EX] * 2, [s, s], "d1")
        + task_scores(SudokuTask(), [SUDOKU_EX], [s], "compact")
    ),
}


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_parsers_are_linear_at_1mb(parser: str) -> None:
    fn = PARSERS[parser]
    for size in (MB // 16, MB):  # the 64 KB pass fails fast (seconds, not hours) if one turns quadratic
        slow = []
        for name, (prefix, unit, suffix) in HOSTILE.items():
            text = prefix + _fill(unit, size - len(prefix) - len(suffix)) + suffix
            start = time.process_time()  # CPU time: the other jobs on the machine do not count
            fn(text)
            spent = time.process_time() - start
            if spent > BOUND_S:
                slow.append(f"{name}: {spent:.2f} s")
        assert not slow, f"{parser} at {size} characters: {slow}"
