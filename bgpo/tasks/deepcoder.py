"""``deepcoder``: BGPO's code training set — DeepCoder-format problems, tested on HumanEval and MBPP
(BGPO §4: one code model, 560 steps = 5 epochs × 112 steps of 16 prompts).

Data. ``train_file``: a local JSON/JSONL/CSV/parquet file of DeepCoder rows (the columns of
``agentica-org/DeepCoder-Preview-Dataset``): ``problem`` (the statement), ``tests`` (a list, or its
JSON text), optionally ``starter_code`` and ``metadata`` (a dict or its JSON, with ``func_name``).
The subset BGPO trains on (its repository's preprocessed code data, about 1.8k problems) is not
shipped: put it there. ``hub_name`` (+ ``hub_config``, ``hub_split``) reads a hub data set instead.
The test sets are HumanEval's and MBPP's (``task.eval_tasks: {humaneval: {}, mbpp: {}}``,
``bgpo.evaluation``); ``test_file`` (same row format) gives this task a test set of its own.

Tests of a row, normalised to (kind, input, expected):
- a list of ``{"input", "output"}`` dicts; ``type``/``testtype`` ``functional`` marks a
  function-call test (LiveCodeBench: the input holds one JSON value per line, the arguments), any
  other value (``stdin_stdout``, ``stdin``) or none a stdin/stdout test;
- a dict ``{"inputs": [...], "outputs": [...]}`` (TACO/APPS): stdin/stdout tests, or function-call
  tests when it has ``fn_name`` (each input is the argument list; an output given as a one-element
  list may also match its element).
stdin/stdout: the program's standard output must equal the expected output token for token
(whitespace-split, so trailing spaces and newlines do not matter). function call: ``func_name``
(a ``class Solution`` method when the code defines that class) called with the arguments, result
``==`` the expected JSON value.

Reward: the code (``sandbox.extract_code``) and the first ``max_tests`` tests run in ONE sandboxed
run (wall-clock ``timeout`` for all tests together): 1.0 if every test passes, else 0. With a
sandbox that judges trusted tests (``sandbox.CodeJob`` / ``run_job``: the verdict is the
harness's token, not the exit status) the program defines two entry points around the model's
code — ``__bgpo_stdin__(text)`` runs it as ``__main__`` with that stdin and returns what it
printed, ``__bgpo_call__(args)`` calls ``func_name`` — and the tests (trusted, ``job``) compare
their results; with an exit-status sandbox (``sandbox.run_program``) one script runs everything
(``program``). Validation: ``n_val`` problems held out of the training rows (a fixed shuffle).
"""

from __future__ import annotations

import json
import random
from typing import Any

from bgpo.tasks.base import D1_INSTRUCTIONS, Example, Format, check_format, d1_completion, register_task
from bgpo.tasks.data import load_records, sample_pool
from bgpo.tasks.sandbox import extract_code

VAL_SEED = 0

_HARNESS = '''import contextlib, io, json, sys
CODE = {code!r}
TESTS = {tests!r}
FN = {fn!r}

def stdin_run(text):
    out = io.StringIO()
    sys.stdin = io.StringIO(text)
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(CODE, "<solution>", "exec"), {{"__name__": "__main__"}})
        except SystemExit:
            pass
    sys.stdin = sys.__stdin__
    return out.getvalue()

def call(args):
    ns = {{"__name__": "solution"}}
    exec(compile(CODE, "<solution>", "exec"), ns)
    fn = getattr(ns["Solution"](), FN) if "Solution" in ns else ns[FN]
    return fn(*args)

for kind, given, expected in TESTS:
    if kind == "stdin":
        ok = stdin_run(given).split() == expected.split()
    else:
        got = call([json.loads(a) for a in given.splitlines() if a.strip()])
        want = json.loads(expected)
        ok = got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])
    if not ok:
        sys.exit(1)
'''


_ENTRIES = '''__bgpo_code__ = {code!r}


def __bgpo_stdin__(text):
    import contextlib
    import io
    import sys

    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(__bgpo_code__, "<solution>", "exec"), {{"__name__": "__main__"}})
            except SystemExit:
                pass
    finally:
        sys.stdin = saved
    return out.getvalue()


def __bgpo_call__(args):
    ns = {{"__name__": "solution"}}
    exec(compile(__bgpo_code__, "<solution>", "exec"), ns)
    fn = getattr(ns["Solution"](), {fn!r}) if "Solution" in ns else ns[{fn!r}]
    return fn(*args)
'''


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value.strip()[:1] in ("[", "{") else value


def normalize_tests(tests: Any) -> list[tuple[str, str, str]]:
    """A row's tests as ``(kind, input, expected)`` with kind ``stdin`` or ``call`` (see the module
    docstring); function-call inputs are one JSON argument per line."""
    tests = _json(tests)
    out: list[tuple[str, str, str]] = []
    if isinstance(tests, dict):
        for given, expected in zip(tests.get("inputs", []), tests.get("outputs", []), strict=False):
            if tests.get("fn_name"):
                args = given if isinstance(given, list) else [given]
                out.append(("call", "\n".join(json.dumps(a) for a in args), json.dumps(expected)))
            else:
                out.append(("stdin", str(given), str(expected)))
        return out
    for t in tests or []:
        kind = str(t.get("testtype") or t.get("type") or "stdin")
        out.append(("call" if kind == "functional" else "stdin", str(t["input"]), str(t["output"])))
    return out


def _to_example(row: dict[str, Any], index: int, source: str) -> Example:
    meta, raw = _json(row.get("metadata")) or {}, _json(row["tests"])
    fn_name = ((meta.get("func_name") if isinstance(meta, dict) else None) or row.get("fn_name")
               or (raw.get("fn_name") if isinstance(raw, dict) else None))
    tests = normalize_tests(raw)
    if any(kind == "call" for kind, _, _ in tests) and not fn_name:
        raise ValueError(f"{source} row {index}: function-call tests but no metadata.func_name")
    fields = {"problem": row["problem"], "starter_code": row.get("starter_code") or "", "tests": tests,
              "fn_name": fn_name}
    solution = row.get("solution") or (row.get("solutions") or [None])[0]
    return Example(fields, solution, {"source": source, "index": index})


@register_task("deepcoder")
class DeepCoderTask:
    """BGPO §4's code training source; see the module docstring for data, tests and reward."""

    name = "deepcoder"

    def __init__(self, train_file: str | None = None, hub_name: str | None = None,
                 hub_config: str | None = None, hub_split: str = "train", test_file: str | None = None,
                 n_test: int | None = None, n_val: int = 128, max_tests: int | None = None,
                 timeout: float = 10.0) -> None:
        if n_val < 1:
            raise ValueError(f"task.options.n_val={n_val} must be >= 1")
        self.train_file, self.hub_name = train_file, hub_name
        self.hub_config, self.hub_split = hub_config, hub_split
        self.test_file, self.n_test, self.n_val = test_file, n_test, n_val
        self.max_tests, self.timeout = max_tests, timeout
        self._split: tuple[list[Example], list[Example]] | None = None
        self._test: list[Example] | None = None

    def _pool(self) -> tuple[list[Example], list[Example]]:
        if self._split is None:
            source = self.train_file or self.hub_name
            if source is None:
                raise ValueError("task deepcoder needs task.options.train_file: the DeepCoder-format "
                                 "training problems (BGPO's code subset), or task.options.hub_name")
            rows = load_records(source, None if self.train_file else self.hub_config, self.hub_split)
            pool = [_to_example(r, i, source) for i, r in enumerate(rows)]
            if len(pool) <= self.n_val:
                raise ValueError(f"task.options.n_val={self.n_val} leaves no training problem of the "
                                 f"{len(pool)} in {source}")
            random.Random(VAL_SEED).shuffle(pool)
            self._split = pool[: self.n_val], pool[self.n_val :]
        return self._split

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training problems (seeded shuffles of the rows minus validation, no repeat within a pass)."""
        return sample_pool(self._pool()[1], n, seed)

    def val_examples(self) -> list[Example]:
        return self._pool()[0]

    def test_examples(self) -> list[Example]:
        if self.test_file is None:
            raise ValueError("task deepcoder has no test set of its own: its test sets are task.eval_tasks "
                             "(humaneval, mbpp), or set task.test_file")
        if self._test is None:
            self._test = [_to_example(r, i, self.test_file)
                          for i, r in enumerate(load_records(self.test_file))][: self.n_test]
        return self._test

    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)  # compact == d1 for this GPU-scale task
        f = ex.fields
        if f["fn_name"]:
            how = f"Write the Python function `{f['fn_name']}`"
            how += f", completing:\n```python\n{f['starter_code']}\n```" if f["starter_code"] else "."
        else:
            how = "Write a Python program that reads the input from standard input and prints the answer."
        return (f"{f['problem']}\n{how}\n" + D1_INSTRUCTIONS
                + "\nThe final answer is the complete Python code in a ```python ... ``` block.")

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        if ex.solution is None:
            raise ValueError("this DeepCoder example has no reference solution")
        return d1_completion("A direct implementation.", f"```python\n{ex.solution.strip()}\n```")

    def program(self, ex: Example, completion: str) -> str:
        """The script that is run: the extracted code under a harness running the tests."""
        tests = ex.fields["tests"][: self.max_tests]
        return _HARNESS.format(code=extract_code(completion), tests=tests, fn=ex.fields["fn_name"])

    def job(self, ex: Example, completion: str) -> Any:
        """The ``sandbox.CodeJob``: the entry points around the code (untrusted) and one assert per
        test (trusted; expected values decoded here, outside the sandbox)."""
        from bgpo.tasks.sandbox import CodeJob

        lines = []
        for kind, given, expected in ex.fields["tests"][: self.max_tests]:
            if kind == "stdin":
                lines.append(f"assert __bgpo_stdin__({given!r}).split() == {expected!r}.split()")
                continue
            args = [json.loads(a) for a in given.splitlines() if a.strip()]
            want = json.loads(expected)
            alts = [want, want[0]] if isinstance(want, list) and len(want) == 1 else [want]
            lines.append(f"got = __bgpo_call__({args!r})")
            lines.append("assert " + " or ".join(f"got == {w!r}" for w in alts))
        program = _ENTRIES.format(code=extract_code(completion), fn=ex.fields["fn_name"])
        return CodeJob(program=program, tests="\n".join(lines) + "\n")

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        import bgpo.tasks.sandbox as sandbox

        check_format(fmt)
        if hasattr(sandbox, "run_job"):  # trusted tests judged by the harness's token
            ok = sandbox.run_job(self.job(ex, completion), timeout=self.timeout)
        else:  # an exit-status sandbox: one script
            ok = sandbox.run_program(self.program(ex, completion), timeout=self.timeout)
        return 1.0 if ok else 0.0

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self.reward(ex, completion, fmt) == 1.0
