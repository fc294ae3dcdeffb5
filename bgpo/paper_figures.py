"""The figures of ``paper/figures/`` (called by ``python -m bgpo.paper``; matplotlib, Agg backend).

Output is deterministic for one matplotlib version: PNGs carry no "Software" entry and PDFs no
creation date. A figure with no data is not drawn (and a stale copy is removed); the generated
``README.md`` says which figures exist, from which files, and why any is missing.

Benchmark rows read here (``results/bench/*.jsonl``, one JSON object per line):

* ``memory-*.jsonl``: ``{"method", "mc", "peak_bytes", "rss_peak_bytes", "floor_bytes",
  "step_time_s", "device", "model", "commit"}``; optional ``"oom": true`` (no peak then).
* ``variance-*.jsonl``, told apart by ``kind``:

  - ``{"kind": "grad", "method", "mc", "grad_std", "bias_rel", "device", "model",
    "commit"}`` — docs/methods.md §5 Fig. 3: the gradient of one batch computed repeatedly with fresh MC
    draws; ``grad_std`` = the per-parameter std over repeats, averaged over parameters;
    ``bias_rel`` = ‖mean gradient − gold‖ / ‖gold‖ with the n_t = 256 gradient as gold
    (``null`` for the gold point itself).
  - ``{"kind": "elbo_diff", "coupled", "level", "stratified", "n", "var", "commit"}`` — the
    variance of the ELBO difference ℓ_θ − ℓ_old estimated with ``n`` draws, for coupled
    (shared masks) or independent draws, mask level ``time``|``count``, stratified or iid.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"bgpo": "C0", "bgpo_offpolicy": "C4", "vrpo": "C1", "diffugrpo": "C2", "wd1": "C3",
          "spg": "C5", "espo": "C6", "coupledgrpo": "C7", "tracerl": "C8", "justgrpo": "C9"}
LABELS = {"bgpo": "BGPO", "bgpo_offpolicy": "BGPO (off-policy)", "vrpo": "VRPO-OL",
          "diffugrpo": "diffu-GRPO", "wd1": "wd1", "spg": "SPG", "espo": "ESPO",
          "coupledgrpo": "coupled-GRPO", "tracerl": "TraceRL", "justgrpo": "JustGRPO"}
ORDER = list(LABELS)
LATER = ("spg", "espo", "coupledgrpo", "tracerl", "justgrpo")
# methods with identical curves (memory: VRPO-OL, diffu-GRPO, wd1) stay visible: own marker and dash
STYLES = {"bgpo": ("o", "-", 7), "bgpo_offpolicy": ("P", "-", 7), "vrpo": ("s", "-", 9),
          "diffugrpo": ("^", "--", 6), "wd1": ("x", ":", 6)}


def _key(method: str) -> str:
    return method.replace("_", "").replace("-", "").lower()


def _methods(items: Any) -> list[str]:
    return sorted(set(items), key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def _save(fig: Any, out: Path, stem: str, formats: tuple[str, ...]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None}}
    for fmt in formats:
        fig.savefig(out / f"{stem}.{fmt}", format=fmt, metadata=meta[fmt], dpi=150)
    plt.close(fig)
    return [f"{stem}.{fmt}" for fmt in formats]


def _panels(n: int, width: float = 4.2, cols: int = 3) -> tuple[Any, list[Any]]:
    """``n`` panels, at most ``cols`` to a row (unused cells hidden)."""
    n = max(n, 1)
    rows, cols = -(-n // cols), min(n, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


DEVICES = {"cpu": "CPU", "cuda": "GPU", "mps": "Apple GPU"}
MODELS = {"tiny": "tiny dLLM: BGPO and its baselines", "tiny-beyond": "tiny dLLM: the methods after BGPO",
          "tiny-ac": "tiny dLLM, activation checkpointing"}
TASKS = {"countdown": "Countdown", "sudoku": "Sudoku", "math": "MATH + GSM8K", "deepcoder": "DeepCoder"}
SWEEPS = {"tiny_repro": "BGPO and its baselines", "tiny_mc": "BGPO over n_t", "tiny_bounds": "bound ablation",
          "tiny_equal_memory": "equal memory", "tiny_offpolicy": "off-policy BGPO",
          "testbed": "BGPO, testbed settings"}


def panel_title(device: str, model: str) -> str:
    """``cpu`` · ``tiny-beyond`` → "tiny dLLM: the methods after BGPO (CPU)"."""
    return f"{MODELS.get(model, model)} ({DEVICES.get(device, device)})"


def same_curve(a: list[tuple[float, float]], b: list[tuple[float, float]], rtol: float = 0.01) -> bool:
    """Two (x, y) series at the same x with every y within ``rtol``: drawn as one line."""
    return [x for x, _ in a] == [x for x, _ in b] and all(
        abs(ya - yb) <= rtol * max(abs(ya), abs(yb)) for (_, ya), (_, yb) in zip(a, b, strict=True))


def bench_vs_mc(rows: list[dict[str, Any]], field: str, ylabel: str, scale: float, floor: bool) -> Any:
    """One panel per (device, model): ``field`` against n_t (log2 axis), one line per method.
    Methods whose points coincide (within 1%) share one line and one legend entry, so no line hides
    under another; the floor is a wide grey band behind the lines, visible where BGPO sits on it."""
    last: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        last[(str(r.get("device")), str(r.get("model")), _key(str(r["method"])), int(r["mc"]))] = r
    groups = sorted({k[:2] for k in last})
    fig, axes = _panels(len(groups))
    for ax, (device, model) in zip(axes, groups, strict=True):
        pts = {k: v for k, v in last.items() if k[:2] == (device, model)}
        lines: list[tuple[list[str], list[tuple[float, float]]]] = []
        for m in _methods(k[2] for k in pts):
            xy = sorted((k[3], v[field] / scale) for k, v in pts.items()
                        if k[2] == m and isinstance(v.get(field), (int, float)))
            if not xy:
                continue
            twin = next((names for names, other in lines if same_curve(xy, other)), None)
            if twin is not None:
                twin.append(m)
            else:
                lines.append(([m], xy))
        for names, xy in lines:
            marker, dash, size = STYLES.get(names[0], ("o", "-", 6))
            ax.plot(*zip(*xy, strict=True), marker=marker, linestyle=dash, markersize=size, zorder=3,
                    color=COLORS.get(names[0]), label=" = ".join(LABELS.get(m, m) for m in names),
                    markerfacecolor="none")
        fl = sorted((k[3], v["floor_bytes"] / scale) for k, v in pts.items()
                    if floor and isinstance(v.get("floor_bytes"), (int, float)))
        if fl:
            mcs = sorted({x for x, _ in fl})
            means = [sum(y for x, y in fl if x == mc) / sum(1 for x, _ in fl if x == mc) for mc in mcs]
            ax.plot(mcs, means, "-", color="0.6", lw=9, alpha=0.35, zorder=1, solid_capstyle="butt",
                    label="floor: one MC sample's forward + backward")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set(xlabel="n_t (MC samples per response)", ylabel=ylabel, title=panel_title(device, model))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def validation_curves(runs: list[Any]) -> Any:
    """One panel per (sweep, task, family): validation accuracy against step, each seed a thin line,
    the mean over seeds bold, the range of the seeds shaded (what 2-3 seeds can support: a t-interval
    of 3 seeds is ±4.3 standard errors). BGPO's own comparison and the methods after it get a panel
    each, BGPO in both."""
    curves: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.curve:
            for family in ("", "later") if r.method == "bgpo" else ("later" if r.method in LATER else "",):
                curves[(r.sweep, r.task, family)][r.method].append(dict(r.curve))
    curves = {k: v for k, v in curves.items() if k[2] == "" or len(v) > 1}
    fig, axes = _panels(len(curves))
    for ax, (sweep, task, family) in zip(axes, sorted(curves), strict=True):
        for m in _methods(curves[(sweep, task, family)]):
            seeds = curves[(sweep, task, family)][m]
            color = COLORS.get(m)
            for c in seeds:
                ax.plot(sorted(c), [100 * c[s] for s in sorted(c)], color=color, lw=0.5, alpha=0.45)
            steps = sorted({s for c in seeds for s in c})
            vals = [[100 * c[s] for c in seeds if s in c] for s in steps]
            mean = [sum(v) / len(v) for v in vals]
            ax.plot(steps, mean, color=color, lw=1.8, label=f"{LABELS.get(m, m)} (seeds={len(seeds)})")
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color,
                            alpha=0.15, lw=0)
        what = "BGPO and the methods after it" if family else SWEEPS.get(sweep, sweep)
        title = f"{TASKS.get(task, task)}: {what}"
        ax.set(xlabel="RL step", ylabel="validation accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def interval_points(items: list[tuple[str, Any]], xlabel: str, title: str, base: Any = None,
                    logx: bool = False, xs: list[float] | None = None, panels: int = 1) -> Any:
    """Accuracy with 95% intervals (``bgpo.stats.Interval``) per x (n_t or a method), a base band;
    in the first of ``panels`` panels."""
    fig, axes = _panels(panels, width=5.0)
    ax = axes[0]
    pos = xs or list(range(len(items)))
    for x, (_, iv) in zip(pos, items, strict=True):
        ax.errorbar([x], [100 * iv.value], yerr=[[100 * (iv.value - iv.lo)], [100 * (iv.hi - iv.value)]],
                    fmt="o", color="C0", capsize=3)
    if base is not None:
        ax.axhline(100 * base.value, color="0.3", ls="--", lw=1, label="base model")
        ax.axhspan(100 * base.lo, 100 * base.hi, color="0.5", alpha=0.15, lw=0)
        ax.legend(fontsize=7)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(pos, [name for name, _ in items])
    else:
        ax.set_xticks(pos, [name for name, _ in items], rotation=20, fontsize=7)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%), selected checkpoint", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def std_interval(std: float, repeats: int) -> tuple[float, float]:
    """The 95% interval of a standard deviation estimated from ``repeats`` draws (χ² with
    repeats − 1 degrees of freedom; for ``grad_std``, a mean of per-parameter stds, it is wider
    than needed, never narrower)."""
    from scipy.stats import chi2

    df = repeats - 1
    return std * (df / chi2.ppf(0.975, df)) ** 0.5, std * (df / chi2.ppf(0.025, df)) ** 0.5


def gradient_std_bias(rows: list[dict[str, Any]]) -> Any:
    """BGPO Fig. 3 at tiny scale: gradient std (with its χ² interval) and bias against n_t per
    method (kind=grad), and the variance of the ELBO-difference estimate (kind=elbo_diff)."""
    grad = [r for r in rows if r.get("kind") == "grad"]
    elbo = [r for r in rows if r.get("kind") == "elbo_diff"]
    gold = sorted({int(r["gold_mc"]) for r in grad if isinstance(r.get("gold_mc"), int)})
    gold_txt = f"n_t = {gold[0]}" if len(gold) == 1 else "a large n_t"
    specs = [(f, lab, title) for f, lab, title in (
        ("grad_std", "gradient std (mean over parameters)", "gradient std over repeated draws"),
        ("bias_rel", "‖mean gradient − gold‖ / ‖gold‖", f"gradient bias (gold: {gold_txt}, not plotted)"))
        if any(isinstance(r.get(f), (int, float)) for r in grad)]
    fig, axes = _panels(len(specs) + bool(elbo))
    for ax, (f, lab, title) in zip(axes, specs, strict=False):
        for m in _methods(_key(str(r["method"])) for r in grad):
            pts = sorted((int(r["mc"]), r) for r in grad
                         if _key(str(r["method"])) == m and isinstance(r.get(f), (int, float)))
            if not pts:
                continue
            xs, ys = [x for x, _ in pts], [r[f] for _, r in pts]
            if f == "grad_std" and all(isinstance(r.get("repeats"), int) for _, r in pts):
                ivs = [std_interval(r[f], r["repeats"]) for _, r in pts]
                err = [[y - lo for y, (lo, _) in zip(ys, ivs, strict=True)],
                       [hi - y for y, (_, hi) in zip(ys, ivs, strict=True)]]
                ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=COLORS.get(m),
                            label=LABELS.get(m, m))
            else:
                ax.plot(xs, ys, "o-", color=COLORS.get(m), label=LABELS.get(m, m))
            if f == "bias_rel" and all(isinstance(r.get("dist_rel"), (int, float)) for _, r in pts):
                # about what an unbiased estimator shows from the repeats' noise alone: mean ‖ĝ − gold‖ / √R
                noise = [r["dist_rel"] / r["repeats"] ** 0.5 for _, r in pts]
                first = not any(ln.get_linestyle() == ":" for ln in ax.get_lines())
                ax.plot(xs, noise, ":", color=COLORS.get(m), lw=1,
                        label="dotted: noise level of an unbiased mean" if first else None)
        ax.set(yscale="log", xlabel="n_t (MC samples per response)", ylabel=lab, title=title)
        ax.set_xscale("log", base=2)
    if elbo:
        ax = axes[-1]
        configs = sorted({(bool(r["coupled"]), str(r["level"]), bool(r["stratified"])) for r in elbo})
        for c in configs:
            xy = sorted((int(r["n"]), r["var"]) for r in elbo
                        if (bool(r["coupled"]), str(r["level"]), bool(r["stratified"])) == c)
            label = f"{'coupled' if c[0] else 'independent'}, {c[1]}{', stratified' if c[2] else ''}"
            ax.plot(*zip(*xy, strict=True), "o-", label=label)
        ax.set(yscale="log", xlabel="n (MC draws)", ylabel="Var[ℓ_θ − ℓ_old estimate]",
               title="variance of the ELBO difference")
        ax.set_xscale("log", base=2)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _interval_series(runs: list[Any], sweep: str, by_mc: bool) -> tuple[list, Any, list[tuple[str, int]]]:
    """(label, Interval) per n_t (BGPO runs) or per method of the first task of a sweep, the base, and
    the (method, n_t) of each point; with the runs of other sweeps that differ only in what the
    sweep varies (tiny_repro's BGPO at n_t 16), as the tables take them."""
    from bgpo.paper_runs import METHODS, VARIED, borrowed, compare, groups_of
    from bgpo.paper_settings import EQUAL_MEMORY_MC

    if by_mc:
        sel = borrowed(runs, sweep, VARIED["mc_ablation"], lambda r: r.method == "bgpo")
    else:
        sel = borrowed(runs, sweep, VARIED["equal_memory"], lambda r: EQUAL_MEMORY_MC.get(r.method) == r.mc)
    sel = [r for r in sel if r.scores("best", "own", "accuracy") is not None]
    if by_mc:
        sel = [r for r in sel if r.method == "bgpo"]
    if not sel:
        return [], None, []
    task = sorted({r.task for r in sel})[0]
    sel = [r for r in sel if r.task == task]
    if by_mc:
        groups = {str(mc): [r for r in sel if r.mc == mc] for mc in sorted({r.mc for r in sel})}
        used = [("bgpo", mc) for mc in sorted({r.mc for r in sel})]
    else:
        by_method = groups_of(sel)
        groups = {f"{METHODS.get(m, m)} (n_t {','.join(str(x) for x in sorted({r.mc for r in rs}))})": rs
                  for m, rs in by_method.items()}
        used = [(m, rs[0].mc) for m, rs in by_method.items()]
    res = compare(groups, "best", "own", "accuracy", ref="__none__")
    keep = [i for i, g in enumerate(groups) if g in res.cells]
    return ([(g, res.cells[g]) for i, g in enumerate(groups) if i in keep], res.cells.get("base"),
            [used[i] for i in keep])


def equal_memory(points: list[tuple[str, Any]], base: Any, used: list[tuple[str, int]],
                 memory: list[dict[str, Any]]) -> Any:
    """Left: test accuracy per method at its equal-memory n_t; right: the peak memory each used
    (the benchmark's row for that method and n_t on the tiny model, CPU) under the budget line
    (VRPO-OL's peak at n_t 2, ``bgpo.paper_settings``); a pair with no benchmark row is marked."""
    from bgpo.paper_runs import method_key

    fig = interval_points(points, "method (n_t)", "equal memory budget: test accuracy", base, panels=2)
    ax = fig.axes[1]
    tiny = [r for r in memory if (r.get("model"), r.get("device")) == ("tiny", "cpu")]
    peak = {(method_key(str(r["method"])), int(r["mc"])): r["peak_bytes"] / 2**20 for r in tiny
            if not r.get("variant") and not r.get("overrides") and not r.get("oom")}
    vals = [peak.get(u, float("nan")) for u in used]
    ax.bar(range(len(vals)), vals, color=[COLORS.get(m, "C0") for m, _ in used])
    for i, v in enumerate(vals):
        if v != v:  # NaN: no benchmark row for this method and n_t
            ax.annotate("not measured", (i, 0), ha="center", va="bottom", fontsize=7, color="0.4")
    if ("vrpo", 2) in peak:
        ax.axhline(peak[("vrpo", 2)], color="0.3", ls="--", lw=1, label="budget: VRPO-OL's peak at n_t 2")
        ax.set_ylim(0, max([peak[("vrpo", 2)], *(v for v in vals if v == v)]) * 1.25)  # legend above bars
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xticks(range(len(vals)), [name for name, _ in points], rotation=20, fontsize=7)
    ax.set(ylabel="peak memory of the RL update (MiB)", title="memory each used (tiny, CPU benchmark)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def make_figures(runs: list[Any], memory: list[dict[str, Any]], variance: list[dict[str, Any]],
                 out: Path) -> str:
    """Draw every figure that has data into ``out``; return the README listing (Markdown)."""
    plt.rcParams.update({"svg.hashsalt": "bgpo", "font.size": 8})
    mc_points, mc_base, _ = _interval_series(runs, "tiny_mc", by_mc=True)
    eq_points, eq_base, eq_used = _interval_series(runs, "tiny_equal_memory", by_mc=False)
    both, png = ("png", "pdf"), ("png",)
    made_from = {
        "memory_vs_mc": (bool(memory), "peak memory of one RL update against n_t (log2 axis), one line per "
                         "method (methods with the same points share a line and a label), the floor (one MC "
                         "sample's forward + backward) a grey band; one panel per device · model",
                         "results/bench/memory-*.jsonl", both,
                         lambda: bench_vs_mc(memory, "peak_bytes", "peak memory (MiB)", 2**20, True)),
        "step_time_vs_mc": (any(isinstance(r.get("step_time_s"), (int, float)) for r in memory),
                            "time of one RL update step against n_t, one line per method",
                            "results/bench/memory-*.jsonl", both,
                            lambda: bench_vs_mc(memory, "step_time_s", "step time (s)", 1.0, False)),
        "validation_curves": (any(r.curve for r in runs),
                              "validation accuracy against RL step per method: each seed thin, the mean "
                              "bold, the seeds' range shaded; one panel per sweep and task",
                              "<results>/<sweep>/*/metrics.jsonl", both, lambda: validation_curves(runs)),
        "mc_ablation": (bool(mc_points), "BGPO's test accuracy (selected checkpoint, suite test set) against "
                        "n_t with 95% paired-bootstrap intervals; the base model dashed with its interval",
                        "results/tiny_mc/*/eval_test.json", both,
                        lambda: interval_points(mc_points, "n_t (MC samples per response)",
                                                "BGPO: accuracy against n_t", mc_base, logx=True,
                                                xs=[float(k) for k, _ in mc_points])),
        "equal_memory": (bool(eq_points), "test accuracy (selected checkpoint, suite test set) of every "
                         "method within one peak-memory budget, 95% intervals, labels give each "
                         "method's n_t; beside it the peak memory each used (benchmark row of that method "
                         "and n_t)",
                         "results/tiny_equal_memory/*/eval_test.json", both,
                         lambda: equal_memory(eq_points, eq_base, eq_used, memory)),
        "gradient_std_bias": (any(r.get("kind") in ("grad", "elbo_diff") for r in variance),
                              "gradient std (χ² 95% intervals) and bias (dotted: the bias the "
                              "repeats' noise alone gives an unbiased estimator) against n_t per method "
                              "(BGPO Fig. 3), and the variance of the ELBO-difference estimate",
                              "results/bench/variance-*.jsonl", png, lambda: gradient_std_bias(variance)),
    }
    lines = ["# Figures", "", "Made by `python -m bgpo.paper` from the files named below; "
             "a figure with no data is not drawn.", "", "| figure | shows | data |", "|---|---|---|"]
    missing = []
    for stem, (has_data, caption, source, formats, draw) in made_from.items():
        if has_data:
            files = _save(draw(), out, stem, formats)
            lines.append(f"| {', '.join(files)} | {caption} | `{source}` |")
        else:
            for fmt in both:
                (out / f"{stem}.{fmt}").unlink(missing_ok=True)
            missing.append(f"- `{stem}`: not drawn, no rows in `{source}`.")
    return "\n".join(lines + ([""] + missing if missing else [])) + "\n"
