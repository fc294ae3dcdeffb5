"""The paper's claims, one row each, with the tiny-scale verdict and the interval it rests on.

    python -m bgpo.paper        # writes paper/tables/claims.md with the other tables

Each claim of BGPO (arXiv 2510.11683) is turned into paired differences of test accuracy on the
suite's own test set (the VALIDATION-selected checkpoint, never one chosen on the test set):

- Table 1, BGPO ranks first among the four: BGPO − X for X = VRPO-OL, diffu-GRPO, wd1, per task;
- Table 1, off-policy BGPO works: off-policy − base, and off-policy − on-policy BGPO;
- Table 2, accuracy rises with n_t: BGPO at the largest n_t − BGPO at n_t = 1;
- Table 3, both lemmas beat either alone: both − tangent only, both − Jensen only;
- Fig. 1, BGPO beats the baselines at equal memory: BGPO − X, X at the n_t that fits the budget;
- Fig. 1, memory flat in n_t: the benchmark's peak memory at the largest n_t over n_t = 1.

A verdict needs every arm at ``MIN_SEEDS`` seeds: "reproduced in direction" when every difference's
95% interval lies above 0, "not reproduced" when one lies below 0 (the claim reversed), otherwise
"inconclusive"; "not yet run" or "pending" (with the intervals so far) when runs are missing.
The same rule compares each method published after BGPO with BGPO (``later_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bgpo.stats import Interval

if TYPE_CHECKING:
    from bgpo.paper_runs import Run, Table

MIN_SEEDS = 3
SOURCE = "own"  # the suite's own test set: never overlaps training (d1's files do)
BASELINES = ("vrpo", "diffugrpo", "wd1")
LATER = ("spg", "espo", "coupledgrpo", "tracerl", "justgrpo")
TASK_NAMES = {"countdown": "Countdown", "sudoku": "Sudoku"}


Row = tuple[str, str, str, str]  # (claim, the paper's evidence, the differences, the verdict)


def display(method: str) -> str:
    from bgpo.paper_runs import METHODS

    return METHODS.get(method, method)


@dataclass
class Diff:
    """One paired difference ``a − b`` of selected test accuracy, with what it rests on."""

    label: str
    iv: Interval | None
    seeds: int  # the fewest seeds of the two arms
    problems: int

    def text(self) -> str:
        if self.iv is None:
            return f"{self.label}: not yet run"
        return f"{self.label} {self.iv.signed_pct()} ({self.seeds} × {self.problems})"


def texts(ds: list[Diff]) -> str:
    return "; ".join(d.text() for d in ds)


def diff(a: list[Run], b: list[Run], label: str) -> Diff:
    """``a − b`` on the suite's test set, paired on problems and seeds (``paper.compare``)."""
    from bgpo.paper_runs import compare

    if not a or not b:
        return Diff(label, None, min(len(a), len(b)), 0)
    m = compare({"a": a, "b": b}, "best", SOURCE, "accuracy", ref="b")
    iv = m.cells.get("a-b")
    if iv is None:
        return Diff(label, None, 0, 0)
    return Diff(label, iv, min(m.seeds.get("a", 0), m.seeds.get("b", 0)), iv.n_problems)


def gain(a: list[Run], label: str) -> Diff:
    """``a − base`` (the base model measured once, paired on problems)."""
    from bgpo.paper_runs import compare

    m = compare({"a": a}, "best", SOURCE, "accuracy", ref="a") if a else None
    iv = m.cells.get("a-base") if m else None
    return Diff(label, iv, m.seeds.get("a", 0) if m else 0, iv.n_problems if iv else 0)


def verdict(diffs: list[Diff], min_seeds: int = MIN_SEEDS) -> str:
    """The rule above, for a claim that every difference is > 0."""
    ivs = [d.iv for d in diffs]
    if any(iv is None for iv in ivs):
        done = sum(iv is not None for iv in ivs)
        return f"not yet run ({done} of {len(diffs)} comparisons have runs)"
    short = min(d.seeds for d in diffs)
    if short < min_seeds:
        return f"pending ({short} of {min_seeds} seeds)"
    if any(iv.hi < 0 for iv in ivs):  # type: ignore[union-attr]
        return "not reproduced"
    return "reproduced in direction" if all(iv.lo > 0 for iv in ivs) else "inconclusive"  # type: ignore[union-attr]


def pick(runs: list[Run], method: str, task: str, mc: int | None = None) -> list[Run]:
    return sorted((r for r in runs if r.method == method and r.task == task and (mc is None or r.mc == mc)),
                  key=lambda r: r.seed)


def claim_rows(repro: list[Run], mc_runs: list[Run], bounds: list[Run], equal: list[Run],
               memory: list[dict[str, Any]]) -> list[Row]:
    """One row per claim and task."""
    from bgpo.paper_settings import EQUAL_MEMORY_MC

    rows: list[Row] = []
    for task in sorted({r.task for r in repro} | set(TASK_NAMES)):
        name = TASK_NAMES.get(task, task)
        bgpo = pick(repro, "bgpo", task)
        ds = [diff(bgpo, pick(repro, x, task), f"BGPO − {display(x)}") for x in BASELINES]
        rows.append((f"BGPO ranks first among the four ({name})", "Table 1", texts(ds), verdict(ds)))
        off = pick(repro, "bgpo_offpolicy", task)
        ds = [gain(off, "off-policy − base"), diff(off, bgpo, "off-policy − on-policy")]
        # works = gains over the base and is not worse than on-policy BGPO (Table 1: 84.8 vs 87.5)
        v = verdict(ds)
        if v in ("inconclusive", "reproduced in direction"):
            v = verdict(ds[:1]) if ds[1].iv.hi >= 0 else "not reproduced"  # type: ignore[union-attr]
        rows.append((f"off-policy BGPO works ({name})", "Table 1", texts(ds), v))
    for task in sorted({r.task for r in mc_runs} or {"countdown"}):
        name = TASK_NAMES.get(task, task)
        mcs = sorted({r.mc for r in mc_runs if r.task == task and r.method == "bgpo"})
        lo, hi = (mcs[0], mcs[-1]) if len(mcs) >= 2 else (1, 32)
        ds = [diff(pick(mc_runs, "bgpo", task, hi), pick(mc_runs, "bgpo", task, lo), f"n_t {hi} − n_t {lo}")]
        rows.append((f"accuracy rises with n_t ({name})", "Table 2", texts(ds), verdict(ds)))
    for task in sorted({r.task for r in bounds} or {"countdown"}):
        both = pick(bounds, "bgpo_offpolicy", task)
        ds = [diff(both, pick(bounds, v, task), f"both − {v.split('_')[1]} only")
              for v in ("bgpo_tangent", "bgpo_jensen")]
        rows.append((f"both lemmas beat either alone ({TASK_NAMES.get(task, task)})", "Table 3", texts(ds),
                     verdict(ds)))
    for task in sorted({r.task for r in equal} or {"countdown"}):
        bgpo = pick(equal, "bgpo", task, EQUAL_MEMORY_MC["bgpo"])
        ds = [diff(bgpo, pick(equal, x, task, n_t), f"BGPO − {display(x)} (n_t {n_t})")
              for x in BASELINES if (n_t := EQUAL_MEMORY_MC[x])]
        rows.append((f"BGPO beats the baselines at equal memory ({TASK_NAMES.get(task, task)})", "Fig. 1",
                     texts(ds), verdict(ds)))
    rows.append(memory_claim(memory))
    return rows


def memory_claim(memory: list[dict[str, Any]]) -> Row:
    """Peak memory at the largest n_t over n_t = 1 on the same batch (results/bench/memory-*.jsonl):
    flat (≤ 1.1×) for BGPO while VRPO-OL's grows (≥ 2×) reproduces Fig. 1."""
    peak: dict[tuple[str, str, int], float] = {}
    for r in memory:
        if r.get("device") == "cpu" and not r.get("oom") and not r.get("variant"):
            key = (str(r.get("model")), str(r["method"]).replace("_", ""), int(r["mc"]))
            peak[key] = float(r["peak_bytes"])
    ratios: dict[str, tuple[float, int]] = {}
    for m in ("bgpo", "vrpo"):
        mcs = sorted(mc for (model, mm, mc) in peak if model == "tiny" and mm == m)
        if len(mcs) >= 2 and mcs[0] == 1:
            ratios[m] = (peak[("tiny", m, mcs[-1])] / peak[("tiny", m, 1)], mcs[-1])
    evidence = "; ".join(f"{display(m)} peak at n_t {mc} / at n_t 1 = {x:.2f}×"
                         for m, (x, mc) in ratios.items())
    if len(ratios) < 2:
        return "memory flat in n_t (tiny, CPU)", "Fig. 1", evidence, "not yet run (memory benchmark)"
    flat = ratios["bgpo"][0] <= 1.1 and ratios["vrpo"][0] >= 2
    return ("memory flat in n_t (tiny, CPU)", "Fig. 1", evidence,
            "reproduced in direction" if flat else "not reproduced")


def later_rows(repro: list[Run]) -> list[Row]:
    """Each method published after BGPO against BGPO on the same problems: the verdict is for
    "BGPO is ahead" (reproduced = BGPO ahead, not reproduced = the later method ahead)."""
    rows = []
    for m in LATER:
        for task in sorted({r.task for r in repro} | set(TASK_NAMES)):
            d = diff(pick(repro, "bgpo", task), pick(repro, m, task), f"BGPO − {display(m)}")
            v = verdict([d]).replace("reproduced in direction", "BGPO ahead").replace(
                "not reproduced", f"{display(m)} ahead").replace("inconclusive", "no difference resolved")
            rows.append((f"{display(m)} against BGPO ({TASK_NAMES.get(task, task)})", "", d.text(), v))
    return rows


def failed_note(results: Path) -> list[str]:
    """Runs that ended in ``failed.json`` (a non-finite loss or gradient): part of the verdict."""
    from bgpo.results import read_failure

    out = []
    for f in sorted(results.glob("tiny_*/*/failed.json")):
        fail = read_failure(f.parent) or {}
        out.append(f"{f.parent.relative_to(results).as_posix()} failed at step {fail.get('step')}: "
                   f"{fail.get('reason')} (not in the intervals).")
    return out


def claims_table(runs: list[Run], memory: list[dict[str, Any]], results: Path) -> Table:
    """``tables/claims.md``: the rows of ``claim_rows`` and ``later_rows`` as one table."""
    from bgpo.paper_runs import VARIED, Table, borrowed
    from bgpo.paper_settings import EQUAL_MEMORY_MC

    repro = [r for r in runs if r.sweep == "tiny_repro"]
    mc_runs = borrowed(runs, "tiny_mc", VARIED["mc_ablation"], lambda r: r.method == "bgpo")
    bounds = borrowed(runs, "tiny_bounds", VARIED["bounds"],
                      lambda r: r.method in ("bgpo_offpolicy", "bgpo_tangent", "bgpo_jensen"))
    equal = borrowed(runs, "tiny_equal_memory", VARIED["equal_memory"],
                     lambda r: EQUAL_MEMORY_MC.get(r.method) == r.mc)
    rows = claim_rows(repro, mc_runs, bounds, equal, memory) + later_rows(repro)
    body = [[(claim, ""), (evidence or "later method", ""), (text, ""), (v, "")]
            for claim, evidence, text, v in rows]
    notes = [f"Differences in points of test accuracy (%) on the suite's own test set (Countdown 1024 "
             f"problems, Sudoku 1024 puzzles solved), of the VALIDATION-selected checkpoints, with a 95% "
             f"interval from the paired bootstrap over problems and seeds (`bgpo.stats`); (seeds × "
             f"problems) is the fewest of the two arms. Verdict: every interval above 0 = reproduced in "
             f"direction; one below 0 = not reproduced; otherwise inconclusive; fewer than {MIN_SEEDS} "
             f"seeds = pending. Runs: results/tiny_repro (Table 1, the later methods), results/tiny_mc, "
             f"results/tiny_bounds, results/tiny_equal_memory (each with tiny_repro's BGPO run of the "
             f"same settings); memory: results/bench/memory-cpu-tiny.jsonl.", *failed_note(results)]
    return Table("claims", "The paper's claims at tiny scale: verdicts and the intervals behind them",
                 ["Claim", "Paper", "Paired differences (seeds × problems)", "Verdict"], body, notes)


# ----------------------------------------------------------------------------- compute
# the tiny presets, the runs each plans (sweeps/*.yaml) and how a run of results/ is attributed to one
PRESETS = {"tiny_repro": 24, "tiny_offpolicy": 6, "tiny_mc": 15, "tiny_bounds": 6, "tiny_equal_memory": 9,
           "beyond_tiny": 30}


LIKE = {"tiny_bounds": "tiny_offpolicy", "tiny_mc": "tiny_repro", "tiny_equal_memory": "tiny_repro"}
"""the measured preset whose runs a preset's not-yet-run ones resemble (for the time still to go)"""


def preset_of(sweep: str, method: str) -> str | None:
    if sweep == "tiny_repro":
        return "tiny_offpolicy" if method == "bgpo_offpolicy" else "beyond_tiny" if method in LATER else sweep
    return sweep if sweep in PRESETS else None


def compute_table(results: Path) -> Table:
    """``tables/compute.md``: per tiny preset, runs complete and failed, and the measured wall time of
    a run (``run_seconds``: training, validation and the test evaluations, one thread, over all its
    sittings) — the core-hours the reproduction took and will take."""
    import math

    from bgpo.paper_runs import Table, method_key

    nan = float("nan")
    minutes: dict[str, list[float]] = {p: [] for p in PRESETS}
    failed = {p: 0 for p in PRESETS}
    lost = {p: 0.0 for p in PRESETS}  # core-minutes of failed runs (their logged step times)
    pieced, threaded = 0, 0
    for path in sorted(results.glob("*/*/config.yaml")):
        folder, sweep, cfg = path.parent, path.parent.parent.name, _config(path)
        p = preset_of(sweep, method_key(folder.name.split("-")[0], cfg))  # <method>-<task>-...
        if p is None:
            continue
        threads = int(cfg.get("threads") or 1)  # core-minutes = wall minutes × the run's threads
        if (folder / "summary.json").exists():
            wall, partly = run_seconds(folder)
            minutes[p].append(nan if wall is None else wall / 60 * threads)
            pieced += partly
            threaded += threads > 1
        elif (folder / "failed.json").exists():
            failed[p] += 1
            lost[p] += logged_seconds(folder, None) / 60 * threads
    body, done_h, left_h = [], 0.0, 0.0
    for p, planned in PRESETS.items():
        ms = [m for m in minutes[p] if not math.isnan(m)]
        per = sorted(ms)[len(ms) // 2] if ms else None
        spent = (sum(ms) + lost[p]) / 60
        left = max(planned - len(minutes[p]) - failed[p], 0)
        done_h += spent
        like = sorted(m for m in minutes.get(LIKE.get(p, ""), []) if not math.isnan(m))
        left_h += left * (per or (like[len(like) // 2] if like else 10.0)) / 60
        body.append([(f"`{p}`", ""), (f"{len(minutes[p])} of {planned}", ""), (str(failed[p]), ""),
                     (f"{per:.1f} ({min(ms):.1f}–{max(ms):.1f})" if per else "–", "" if per else "a"),
                     (f"{spent:.1f}", ""), (str(left), "")])
    body.append([("total", ""), (f"{sum(len(v) for v in minutes.values())} of {sum(PRESETS.values())}", ""),
                 (str(sum(failed.values())), ""), ("", ""), (f"{done_h:.1f}", ""),
                 (f"≈ {left_h:.1f} core-hours to go", "")])
    notes = ["Measured wall time of each complete run (`summary.json`: 60 RL steps, validation every 10 "
             "steps, the base/selected/final test evaluations), one thread, two runs side by side on a "
             "2-core machine (each slows the other); a run with `threads` > 1 counts its wall time × "
             "its threads. A failed run counts its logged step times in the core-hours spent, not in "
             "the minutes per run. A run stopped and resumed counts each sitting up to "
             "the checkpoint the next one resumed from (`wall_s_all_sittings`); work redone after a stop "
             "is not counted. Core-hours = the sum over the runs; to go = the runs left × the "
             "preset's median (where none ran yet: the median of the preset it resembles — `tiny_bounds` "
             "off-policy like `tiny_offpolicy`, the others like `tiny_repro` — else 10 min)."]
    if threaded:
        notes.append(f"{threaded} run(s) ran with more than one thread (alone on the machine).")
    if pieced:
        notes.append(f"{pieced} resumed run(s) began before checkpoints recorded their time: their earlier "
                     "sittings count the logged step times (`metrics.jsonl` `time/step_s` up to the resume "
                     "point, the base evaluation included) without those sittings' validation passes, a "
                     "slight undercount.")
    return Table("compute", "Compute of the tiny reproduction (one-thread core-minutes per run)",
                 ["preset", "runs complete", "failed", "minutes per run: median (range)", "core-hours spent",
                  "runs left"], body, notes)


def run_seconds(folder: Path) -> tuple[float | None, bool]:
    """A complete run's wall seconds over all its sittings, and whether they were pieced together
    from ``metrics.jsonl`` (a run resumed from a checkpoint that did not record its time): this
    sitting's seconds + the logged step times up to the last resume point."""
    import json

    s = json.loads((folder / "summary.json").read_text())
    total, this = s.get("wall_s_all_sittings"), s.get("wall_s_this_session")
    if isinstance(total, (int, float)):
        return float(total), False
    if not isinstance(this, (int, float)):
        return None, False
    if not s.get("resumed_at"):
        return float(this), False
    return float(this) + logged_seconds(folder, max(s["resumed_at"])), True


def logged_seconds(folder: Path, up_to: int | None) -> float:
    """The sum of ``metrics.jsonl``'s ``time/step_s`` over steps ≤ ``up_to`` (None: all), of the rows
    ``bgpo.results.read_metrics`` finds valid (a torn last line is skipped)."""
    from bgpo.results import read_metrics

    rows = read_metrics(folder / "metrics.jsonl")[0]
    return sum(float(r.get("time/step_s", 0.0)) for k, r in rows.items() if up_to is None or k <= up_to)


def _config(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}
