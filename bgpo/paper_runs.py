"""The runs of a results folder and how they compare (``bgpo.paper``'s tables and figures, and
``bgpo.claims``, are made from these): complete run folders read and verified, per-problem test
scores, paired-bootstrap intervals (``compare``), the ``Table`` every generated table is, and the
runs an ablation borrows from another sweep (``borrowed``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bgpo.results import (
    UnreadableFile,
    config_hash,
    missing_step,
    read_metrics,
    reason,
    stored_config,
    summary_mismatch,
)
from bgpo.stats import Interval, bootstrap, wilson

TASKS = {"math500": "MATH500", "gsm8k": "GSM8K", "humaneval": "HumanEval", "mbpp": "MBPP",
         "sudoku": "Sudoku", "countdown": "Countdown"}
METHODS = {"bgpo": "BGPO", "bgpo_offpolicy": "BGPO (off-policy)", "bgpo_tangent": "BGPO, Lemma 1 only",
           "bgpo_jensen": "BGPO, Lemma 2 only", "vrpo": "VRPO-OL", "diffugrpo": "diffu-GRPO", "wd1": "wd1",
           "spg": "SPG", "espo": "ESPO", "coupledgrpo": "coupled-GRPO", "tracerl": "TraceRL",
           "d2": "d2", "justgrpo": "JustGRPO"}
ORDER = list(METHODS)
SOURCES = {"own": "suite test set", "d1": "d1 test file"}
# per task: (metric in per_problem, its name in the tables)
METRICS = {"sudoku": [("accuracy", "solved"), ("reward", "cells")]}
DEFAULT_METRICS = [("accuracy", "accuracy")]


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One complete run folder, reduced to what the tables and figures need."""

    sweep: str
    method: str  # table key: bgpo | bgpo_offpolicy | bgpo_tangent | bgpo_jensen | vrpo | ...
    task: str
    mc: int
    seed: int
    variant: str  # config hash without the seed: runs of one cell share it
    base: str  # identity of the start point (base model hash, else its path)
    tests: dict[str, Any]  # eval_test.json
    commit: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation accuracy)
    config: dict[str, Any] = field(default_factory=dict)

    def scores(self, which: str, source: str, metric: str) -> np.ndarray | None:
        res = (self.tests.get(which) or {}).get(source) or {}
        per = (res.get("per_problem") or {}).get(metric)
        return None if per is None else np.asarray(per, dtype=np.float64)


def method_key(name: str, cfg: dict[str, Any] | None = None) -> str:
    """The table row of a run: its method, and for BGPO the off-policy variant (``minibatches`` > 1,
    BGPO §4) and the bounds ablation (``method.cfg.bound``, BGPO Table 3)."""
    cfg = cfg or {}
    key = name.replace("_", "").replace("-", "").lower()
    if key != "bgpo":
        return key
    bound = ((cfg.get("method") or {}).get("cfg") or {}).get("bound", "both")
    if bound != "both":
        return f"bgpo_{bound}"
    return "bgpo_offpolicy" if int(cfg.get("minibatches", 1)) > 1 else key


def rank(method: str) -> int:
    return ORDER.index(method) if method in ORDER else len(ORDER)


def base_identity(cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    base = summary.get("base_model") or cfg.get("base_model") or {}
    if isinstance(base, dict) and base.get("hash"):
        return str(base["hash"])
    model = cfg.get("model") or {}
    task = (cfg.get("task") or {}).get("name")
    return f"{model.get('kind', '?')}:{model.get('path') or f'cached-tiny-{task}'}"


SUMMARY_FIELDS = {"method": str, "task": str, "mc": int, "seed": int}
"""what the tables read from a run's ``summary.json``"""


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object; :class:`UnreadableFile` naming ``path`` when it does not parse or is not one."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnreadableFile(f"{path} is unreadable ({reason(e)}): not {what}; move its run folder away or "
                             "re-run the run to rewrite it") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(f"{path} is not a JSON object: not {what}; move its run folder away or "
                             "re-run the run")
    return obj


def load_run(results: Path, path: Path) -> Run:
    """The run whose ``summary.json`` is ``path``, checked: the summary is its folder's (its run
    key, method, task, n_t and seed are the config's) and its metrics rows are whole."""
    folder = path.parent
    s = read_json_object(path, "a run's summary")
    bad = [k for k, t in SUMMARY_FIELDS.items() if not isinstance(s.get(k), t) or isinstance(s.get(k), bool)]
    if bad:
        raise UnreadableFile(f"{path} lacks the run's {', '.join(bad)} (or they have the wrong type): not a "
                             "run's summary")
    cfg = stored_config(folder, "the tables cannot say how the run was configured")
    other = summary_mismatch(s, cfg, folder.name)
    if other:
        raise UnreadableFile(f"{path} is {other}: move the folder away, or re-run the run to rewrite its "
                             "summary")
    metrics = folder / "metrics.jsonl"
    rows, problems = read_metrics(metrics, complete=True)
    gap = missing_step(rows, s["steps"]) if isinstance(s.get("steps"), int) and metrics.exists() else None
    damaged = problems[0] if problems else f"{metrics}: no row for step {gap}" if gap is not None else None
    if damaged:
        raise UnreadableFile(f"{damaged}: the run's metrics are damaged; re-run the run (it resumes and "
                             "recomputes them) or move its folder away")
    rel = folder.relative_to(results).parts
    return Run(
        sweep=rel[0] if len(rel) > 1 else ".", method=method_key(s["method"], cfg), task=s["task"],
        mc=int(s["mc"]), seed=int(s["seed"]),
        variant=config_hash({k: v for k, v in cfg.items() if k not in ("seed", "results_dir")}),
        base=base_identity(cfg, s), tests=read_json_object(folder / "eval_test.json", "a run's test results"),
        commit=str(s.get("commit", "unknown")),
        curve=[(rows[k]["step"], rows[k]["val/accuracy"]) for k in sorted(rows) if "val/accuracy" in rows[k]],
        config=cfg)


def load_runs(results: Path) -> list[Run]:
    """Every complete run (``summary.json`` and ``eval_test.json``) below ``results``, in path order."""
    runs = []
    for path in sorted(results.rglob("summary.json")):
        folder = path.parent
        if "bench" in folder.relative_to(results).parts or not (folder / "eval_test.json").exists():
            continue
        runs.append(load_run(results, path))
    return runs


def load_jsonl(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of benchmark files; a row that does not parse is :class:`UnreadableFile` (file:line)."""
    rows = []
    for p in paths:
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UnreadableFile(f"{p}:{n}: not a JSON row ({reason(e)}); fix or remove it") from None
            if not isinstance(row, dict):
                raise UnreadableFile(f"{p}:{n}: not a JSON object; fix or remove the row")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- cells
Cell = tuple[str, str]  # (text, footnote marks)
NONE: Cell = ("–", "a")


def sources_of(runs: list[Run]) -> list[str]:
    """The test sets the runs report: the suite's own, d1's, then other tasks' (``task.eval_tasks``:
    BGPO §4's math model on GSM8K and MATH500), in that order."""
    found = {s for r in runs for s, res in (r.tests.get("final") or {}).items() if res}
    return [s for s in SOURCES if s in found] + sorted(found - set(SOURCES))


def source_label(source: str) -> str:
    return SOURCES.get(source, f"{TASKS.get(source, source)} test set")


def metrics_of(task: str) -> list[tuple[str, str]]:
    return METRICS.get(task, DEFAULT_METRICS)


def arm(runs: list[Run], which: str, source: str, metric: str) -> np.ndarray | None:
    """``[seeds, problems]`` of the runs' per-problem scores (None when a run lacks them)."""
    rows = [r.scores(which, source, metric) for r in sorted(runs, key=lambda r: r.seed)]
    if not rows or any(x is None for x in rows) or len({len(x) for x in rows}) != 1:  # type: ignore[arg-type]
        return None
    return np.stack(rows)  # type: ignore[arg-type]


def base_arm(runs: list[Run], source: str, metric: str) -> tuple[np.ndarray | None, str]:
    """The base model's per-problem scores, measured once (every run of one base holds the same
    deterministic evaluation); a footnote when the runs started from different bases."""
    bases = {r.base for r in runs}
    if len(bases) != 1:
        return None, "b"
    for r in runs:
        s = r.scores("base", source, metric)
        if s is not None:
            return s, ""
    return None, "a"


def base_interval(scores: np.ndarray, metric: str) -> Interval:
    if metric == "accuracy":  # one greedy evaluation: binomial over the problems
        return wilson(float(scores.sum()), len(scores))
    return bootstrap({"x": scores})["x"]  # a fraction per problem (Sudoku cells): over problems


@dataclass
class Measured:
    """The intervals of one (task, test set, metric) comparison: arm -> Interval."""

    cells: dict[str, Interval]
    seeds: dict[str, int]


def compare(groups: dict[str, list[Run]], which: str, source: str, metric: str,
            ref: str = "bgpo") -> Measured:
    """Every method's interval, its difference from the base and from ``ref`` (BGPO), paired."""
    arms: dict[str, np.ndarray] = {}
    for m, rs in groups.items():
        a = arm(rs, which, source, metric)
        if a is not None:
            arms[m] = a
    every = [r for rs in groups.values() for r in rs]
    base, _ = base_arm(every, source, metric) if every else (None, "a")
    if base is not None and all(a.shape[1] == len(base) for a in arms.values()):
        arms["base"] = base[None, :]
    if not arms:
        return Measured({}, {})
    diffs = [(m, "base") for m in arms if m != "base" and "base" in arms]
    diffs += [(m, ref) for m in arms if m not in ("base", ref) and ref in arms]
    out = bootstrap(arms, diffs)
    if "base" in arms:
        out["base"] = base_interval(arms["base"][0], metric)
    return Measured(out, {m: a.shape[0] for m, a in arms.items()})


def fmt(iv: Interval | None, diff: bool = False) -> Cell:
    if iv is None:
        return NONE
    return (iv.signed_pct() if diff else iv.pct()) + (" *" if diff and iv.excludes_zero else ""), ""


# ----------------------------------------------------------------------------- tables
@dataclass
class Table:
    name: str
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str]


def commits_note(runs: list[Run]) -> list[str]:
    short = sorted({c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in (r.commit for r in runs)})
    return [f"Commits of the runs used: {', '.join(short)}."] if short else []


STAT_NOTE = ("Accuracy % [95% interval]: paired bootstrap over test problems and seeds (2000 replicates; "
             "`bgpo.stats`); the base model measured once with its Wilson interval; Δ = difference in "
             "points, paired on the same problems, * = its interval excludes 0. `selected` = the RL "
             "checkpoint with the best VALIDATION accuracy (evaluated every `eval_every` steps; the test "
             "set is never looked at); `final` = the last step.")


def groups_of(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (rank(r.method), r.method, r.seed)):
        out.setdefault(r.method, []).append(r)
    return out


def except_keys(cfg: dict[str, Any], keys: tuple[str, ...]) -> str:
    """A config's hash without the seed, the results folder and ``keys`` (dotted paths)."""
    import copy

    c = copy.deepcopy({k: v for k, v in cfg.items() if k not in ("seed", "results_dir")})
    for key in keys:
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config_hash(c)


# what each ablation varies: its table takes the runs of its own sweep folder, plus the runs of any
# other sweep (e.g. tiny_repro) that differ from one of them ONLY in those keys — the shared row
# (BGPO at n_t = 16, both bounds, BGPO in the equal-memory set) is trained once
VARIED = {"mc_ablation": ("mc", "method.cfg.n_t"), "bounds": ("method.cfg.bound",),
          "equal_memory": ("mc", "method")}


def borrowed(runs: list[Run], sweep: str, varied: tuple[str, ...], allow: Any = None) -> list[Run]:
    own = [r for r in runs if r.sweep == sweep]
    keys = {except_keys(r.config, varied) for r in own}
    extra = [r for r in runs if r.sweep != sweep and except_keys(r.config, varied) in keys
             and (allow is None or allow(r))]
    return own + extra


