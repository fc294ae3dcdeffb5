"""``python -m bgpo.paper``: results → paper/ tables and figures (issue 7).

The run folders below are synthetic FIXTURES written into tmp_path (no numbers are committed
anywhere): they check the layout, footnotes, determinism and provenance, not any result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bgpo import paper

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORTED = REPO_ROOT / "paper" / "reported.yaml"


def per_problem(acc: float, n: int, shift: int = 0) -> list[float]:
    """n scores whose mean is acc: the first round(acc·n) problems (rotated by ``shift``) right."""
    k = round(acc * n)
    return [1.0 if (i - shift) % n < k else 0.0 for i in range(n)]


def write_run(results: Path, sweep: str, method: str, task: str, mc: int, seed: int, acc: float,
              best: float | None = None, base: float = 0.25, n: int = 40, minibatches: int = 1,
              bound: str = "both", lr: float = 1e-4, sources: tuple[str, ...] = ("own",),
              base_path: str = "base-A") -> None:
    """A completed run folder as the trainer writes it (config.yaml, metrics.jsonl, eval_test.json,
    summary.json) with per-problem test scores whose means are ``acc`` (final), ``best`` (the
    validation-selected checkpoint; default = acc) and ``base``."""
    folder = results / sweep / f"{method}-{task}-mc{mc}-s{seed}-fixture{minibatches}{bound}{lr}"
    folder.mkdir(parents=True)
    cfg = {"method": {"_target_": f"x.{method}", "cfg": {"bound": bound}}, "task": {"name": task}, "mc": mc,
           "seed": seed, "minibatches": minibatches, "lr": lr, "results_dir": str(results / sweep),
           "model": {"kind": "tiny", "path": base_path}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": s, "reward": 0.1 * s, "val/accuracy": 0.2 + 0.05 * s + 0.01 * seed, "time/step_s": 1.0}
            for s in range(0, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def res(a: float) -> dict:
        return {src: {"accuracy": a, "reward": a, "n": n,
                      "per_problem": {"accuracy": per_problem(a, n, seed), "reward": per_problem(a, n, seed)}}
                for src in sources}

    tests = {"base": {src: {"accuracy": base, "reward": base, "n": n,
                            "per_problem": {"accuracy": per_problem(base, n), "reward": per_problem(base, n)}}
                      for src in sources},
             "final": res(acc), "best": res(acc if best is None else best), "best_step": 2}
    (folder / "eval_test.json").write_text(json.dumps(tests))
    summary = {"method": method, "task": task, "mc": mc, "seed": seed, "final": {}, "wall_s": 4.0,
               "commit": f"{'ab' * 20}"}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """results/ with tiny_repro (BGPO, diffu-GRPO, off-policy BGPO on Countdown), a tiny_mc sweep, a
    tiny_bounds sweep and bench rows; out/ holding a copy of the committed reported.yaml."""
    results, out = tmp_path / "results", tmp_path / "paper"
    for seed, acc in enumerate((0.5, 0.6, 0.7)):
        write_run(results, "tiny_repro", "bgpo", "countdown", 16, seed, acc, best=acc + 0.1,
                  sources=("own", "d1"))
    write_run(results, "tiny_repro", "diffugrpo", "countdown", 1, 0, 0.4, sources=("own", "d1"))
    write_run(results, "tiny_repro", "bgpo", "countdown", 16, 5, 0.3, minibatches=2, sources=("own", "d1"))
    for mc in (1, 2, 32):
        write_run(results, "tiny_mc", "bgpo", "countdown", mc, 0, 0.1 * mc ** 0.5)
    for bound in ("tangent", "jensen", "both"):
        write_run(results, "tiny_bounds", "bgpo", "countdown", 16, 0, 0.3, minibatches=2, bound=bound)
    bench = results / "bench"
    bench.mkdir()
    mem = [{"method": m, "mc": mc, "peak_bytes": 2**20 * (10 + mc * (m == "vrpo")), "rss_peak_bytes": 2**21,
            "floor_bytes": 2**20 * 8, "step_time_s": 0.1 * mc, "device": "cpu", "model": "tiny",
            "commit": "c" * 40} for m in ("bgpo", "vrpo", "diffu_grpo", "wd1") for mc in (1, 4, 16)]
    mem.append({"method": "vrpo", "mc": 32, "oom": True, "device": "cpu", "model": "tiny",
                "commit": "c" * 40})
    (bench / "memory-cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mem))
    var = [{"kind": "grad", "method": m, "mc": mc, "grad_std": 1 / mc, "bias_rel": 0.1 / mc}
           for m in ("bgpo", "vrpo", "diffugrpo") for mc in (1, 4, 16)]
    var += [{"kind": "elbo_diff", "coupled": c, "level": "time", "stratified": False, "n": n,
             "var": (0.1 if c else 1.0) / n} for c in (True, False) for n in (1, 4, 16)]
    (bench / "variance-cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in var))
    out.mkdir()
    shutil.copy(REPORTED, out / "reported.yaml")
    return results, out


def generate(results: Path, out: Path, *extra: str) -> int:
    return paper.main(["--results", str(results), "--out", str(out), *extra])


def table_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "tables").glob("*"))}


def row(md: str, *first_cells: str) -> list[str]:
    """The cells of the Markdown table row that starts with ``first_cells``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[: len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row {first_cells} in\n{md}")


def value(cell: str) -> float:
    """The point estimate of "60.0 [45.0, 75.0]" or "+3.1 [...] *"."""
    return float(cell.split(" [")[0])


def bounds(cell: str) -> tuple[float, float]:
    lo, hi = cell.split("[")[1].split("]")[0].split(", ")
    return float(lo), float(hi)


CD_OWN = "Countdown · suite test set · accuracy"
CD_D1 = "Countdown · d1 test file · accuracy"
GENERATED = {"tiny_repro", "mc_ablation", "bounds", "memory", "reported", "claims", "compute"}


def test_tables_regenerate_byte_identically(tree: tuple[Path, Path]) -> None:
    results, out = tree
    assert generate(results, out, "--tables-only") == 0
    first = table_bytes(out)
    assert set(first) == {f"{n}.{e}" for n in GENERATED for e in ("md", "tex")}
    assert generate(results, out, "--tables-only") == 0
    assert table_bytes(out) == first
    assert generate(results, out, "--check") == 0
    for name, text in first.items():  # every generated file names the command that made it
        assert "generated by `python -m bgpo.paper`" in text.decode().splitlines()[0], name


def test_selected_and_final_cells_with_paired_intervals(tree: tuple[Path, Path]) -> None:
    results, out = tree
    generate(results, out, "--tables-only")
    md = (out / "tables" / "tiny_repro.md").read_text()
    bgpo = row(md, CD_OWN, "BGPO")
    assert bgpo[2] == "3 × 40"
    assert value(bgpo[3]) == 70.0 and value(bgpo[6]) == 60.0  # selected (best) vs final
    lo, hi = bounds(bgpo[3])
    assert lo < 70.0 < hi and hi - lo < 40
    assert value(bgpo[4]) == 45.0 and bgpo[4].endswith("*")  # Δ vs base 25: excludes zero
    base = row(md, CD_OWN, "base model")
    assert base[2] == "1 × 40" and base[3] == "25.0 [14.2, 40.2]"  # Wilson 10/40, measured once
    d1 = row(md, CD_D1, "diffu-GRPO")
    assert value(d1[3]) == 40.0 and value(d1[5]) == -30.0  # Δ vs BGPO (selected 70)
    off = row(md, CD_OWN, "BGPO (off-policy)")
    assert value(off[3]) == 30.0 and off[2] == "1 × 40"
    assert "VRPO-OL" not in md  # no runs, no row
    assert "VALIDATION accuracy" in md and "paired bootstrap" in md
    tex = (out / "tables" / "tiny_repro.tex").read_text()
    assert r"$\Delta$ vs base" in tex and r"\caption{Test accuracy" in tex


def test_mixed_configurations_are_flagged(tree: tuple[Path, Path]) -> None:
    results, out = tree
    write_run(results, "tiny_repro", "wd1", "sudoku", 1, 0, 0.5, lr=1e-4)
    write_run(results, "tiny_repro", "wd1", "sudoku", 1, 1, 0.5, lr=1e-3)
    generate(results, out, "--tables-only")
    md = (out / "tables" / "tiny_repro.md").read_text()
    assert row(md, "Sudoku · suite test set · solved", "wd1<sup>e</sup>")
    assert row(md, "Sudoku · suite test set · cells", "wd1<sup>e</sup>")  # both Sudoku metrics, named


def test_runs_from_different_bases_have_no_base_row(tree: tuple[Path, Path]) -> None:
    results, out = tree
    write_run(results, "other", "wd1", "countdown", 1, 0, 0.5, base_path="base-A")
    write_run(results, "other", "wd1", "countdown", 1, 1, 0.5, base_path="base-B")
    generate(results, out, "--tables-only")
    md = (out / "tables" / "other.md").read_text()
    assert row(md, CD_OWN, "base model")[3] == "–<sup>b</sup>"
    assert "different base models" in md


def test_reported_numbers_come_from_reported_yaml(tree: tuple[Path, Path]) -> None:
    results, out = tree
    reported = yaml.safe_load(REPORTED.read_text())
    generate(results, out, "--tables-only")
    rep = (out / "tables" / "reported.md").read_text()
    for method, values in reported["table1"]["rows"].items():
        label = paper.METHODS.get(method, "LLaDA-8B-Instruct")
        assert row(rep, label, "BGPO Table 1")[2:] == [f"{values[t]:.1f}" for t in paper.TASKS]
    reported["table1"]["rows"]["bgpo"]["countdown"] = 12.3
    reported["mc_ablation"]["rows"][0]["gsm8k"] = 45.6
    (out / "reported.yaml").write_text(yaml.safe_dump(reported))
    generate(results, out, "--tables-only")
    md = (out / "tables" / "tiny_repro.md").read_text()
    assert row(md, CD_OWN, "BGPO")[-1] == "12.3"
    mc = (out / "tables" / "mc_ablation.md").read_text()
    assert row(mc, "Countdown · suite test set", "1")[-2:] == ["43.5", "45.6"]


def test_mc_bounds_and_memory_tables(tree: tuple[Path, Path]) -> None:
    results, out = tree
    generate(results, out, "--tables-only")
    mc = (out / "tables" / "mc_ablation.md").read_text()
    assert value(row(mc, "Countdown · suite test set", "32")[3]) == 57.5  # round(0.566·40)/40
    assert value(row(mc, "Countdown · suite test set", "1")[3]) == 10.0
    assert row(mc, "Countdown · suite test set", "base")[3] == "25.0 [14.2, 40.2]"
    bounds_md = (out / "tables" / "bounds.md").read_text()
    assert row(bounds_md, "Countdown · suite test set", "BGPO, Lemma 1 only")[-1] == "42.1 / 83.5"
    assert row(bounds_md, "Countdown · suite test set", "BGPO (off-policy)")[-1] == "44.9 / 84.5"
    mem = (out / "tables" / "memory.md").read_text()
    assert row(mem, "cpu", "tiny", "VRPO-OL", "16")[4:] == ["26.0", "2.0", "8.0", "1.600", "ccccccc"]
    assert row(mem, "cpu", "tiny", "VRPO-OL", "32")[4] == "OOM"
    assert row(mem, "cpu", "tiny", "diffu-GRPO", "1")[4] == "10.0"


def test_any_results_folder(tmp_path: Path) -> None:
    """A user's own folder (results_dir=runs): runs directly in it form the sweep "."."""
    runs = tmp_path / "runs"
    write_run(runs.parent, "runs", "bgpo", "countdown", 16, 0, 0.5)
    (runs / "bgpo-countdown-mc16-s0-fixture1both0.0001").rename(runs / "x")
    out = tmp_path / "mine"
    assert generate(runs, out, "--tables-only") == 0
    md = (out / "tables" / "top.md").read_text()
    assert value(row(md, CD_OWN, "BGPO")[3]) == 50.0
    assert generate(tmp_path / "nope", out) == 2


def test_empty_results_give_dashes_not_numbers(tmp_path: Path) -> None:
    out = tmp_path / "paper"
    (tmp_path / "results").mkdir()
    assert generate(tmp_path / "results", out) == 0
    assert set(p.stem for p in (out / "tables").glob("*.md")) == {"memory", "reported"}
    assert "<sup>a</sup>" in (out / "tables" / "memory.md").read_text()
    readme = (out / "figures" / "README.md").read_text()
    assert "`memory_vs_mc`: not drawn" in readme and not list((out / "figures").glob("*.png"))


def test_figures_are_written(tree: tuple[Path, Path]) -> None:
    results, out = tree
    assert generate(results, out) == 0
    figs = out / "figures"
    expected = ["memory_vs_mc.png", "memory_vs_mc.pdf", "step_time_vs_mc.png", "step_time_vs_mc.pdf",
                "validation_curves.png", "validation_curves.pdf", "mc_ablation.png", "gradient_std_bias.png"]
    for name in expected:
        assert (figs / name).stat().st_size > 1000, name
    readme = (figs / "README.md").read_text()
    assert readme.startswith("<!-- generated by `python -m bgpo.paper`")
    assert all(name in readme for name in expected)
    png = (figs / "memory_vs_mc.png").read_bytes()
    generate(results, out)
    assert (figs / "memory_vs_mc.png").read_bytes() == png  # deterministic for one matplotlib


def test_figures_read_at_a_glance() -> None:
    """Issue 26.7: coincident lines share one labelled line (none hides under another), panels have
    human titles, and a std from R repeats gets its χ² interval."""
    import matplotlib.pyplot as plt

    from bgpo import paper_figures as pf

    rows = [{"device": "cpu", "model": "tiny", "method": m, "mc": mc, "peak_bytes": b * 2**20,
             "floor_bytes": 128 * 2**20}
            for m, scale in (("bgpo", 0), ("vrpo", 1), ("diffu_grpo", 1), ("wd1", 1.005)) for mc, b in
            ((1, 128), (2, 128 + 128 * scale), (4, 128 + 384 * scale))]
    fig = pf.bench_vs_mc(rows, "peak_bytes", "MiB", 2**20, True)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["BGPO", "VRPO-OL = diffu-GRPO = wd1", "floor: one MC sample's forward + backward"]
    assert ax.get_title() == "tiny dLLM: BGPO and its baselines (CPU)"
    plt.close(fig)
    assert not pf.same_curve([(1, 100.0), (2, 200.0)], [(1, 100.0), (2, 203.0)])
    assert not pf.same_curve([(1, 100.0), (2, 200.0)], [(1, 100.0), (4, 200.0)])
    lo, hi = pf.std_interval(1.0, 8)  # chi2(7): 1.690, 16.013 at 2.5% / 97.5%
    assert abs(lo - (7 / 16.0128) ** 0.5) < 1e-3 and abs(hi - (7 / 1.68987) ** 0.5) < 1e-3


def test_check_reports_stale_tables(tree: tuple[Path, Path]) -> None:
    results, out = tree
    generate(results, out, "--tables-only")
    write_run(results, "tiny_repro", "vrpo", "sudoku", 4, 0, 0.9)
    assert generate(results, out, "--check") == 1
    generate(results, out, "--tables-only")
    assert generate(results, out, "--check") == 0
    (out / "tables" / "old.md").write_text("hand-made\n")
    assert generate(results, out, "--check") == 1


def test_repository_tables_match_repository_results() -> None:
    """The committed paper/tables/* are what `python -m bgpo.paper` makes from the committed results/."""
    results = REPO_ROOT / "results"
    assert paper.main(["--results", str(results), "--out", str(REPO_ROOT / "paper"), "--check"]) == 0, \
        "paper/tables/* are stale: run `nox -s reproduce_tables` and commit paper/"


# ---- nothing destroyed, nothing trusted, one sentence (issue 23, items 5–7) --------------------
def test_out_folders_it_did_not_make_are_never_touched(tree: tuple[Path, Path], capsys) -> None:
    results, out = tree
    for sub in ("tables", "figures"):  # --tables-only too: the marker it writes claims both
        (out / sub).mkdir()
        (out / sub / "notes.md").write_text("my own notes\n")
        assert generate(results, out, "--tables-only") == 2
        err = capsys.readouterr().err
        assert err == (f"[bgpo.paper] --out {out}: {out / sub} is not an empty folder and there is no "
                       f"{out / paper.MARKER} saying `python -m bgpo.paper` made it: nothing is replaced; "
                       "choose another --out, or move it away\n")
        assert [p.name for p in (out / sub).iterdir()] == ["notes.md"] and not (out / paper.MARKER).exists()
        (out / sub / "notes.md").unlink()  # an empty folder is fine
    assert generate(results, out, "--tables-only") == 0
    assert (out / paper.MARKER).read_text() == paper.MARKER_TEXT  # from now on the folder is ours
    (out / "tables" / "old.md").write_text("a table whose sweep is gone\n")
    assert generate(results, out, "--tables-only") == 0 and not (out / "tables" / "old.md").exists()
    (out / paper.MARKER).unlink()  # a folder made before the marker existed: refused too
    assert generate(results, out, "--tables-only") == 2 and "no " in capsys.readouterr().err
    new = out.parent / "new" / "paper"  # created, with the marker
    assert generate(results, new, "--tables-only") == 0 and (new / paper.MARKER).is_file()
    (tmp := out.parent / "a-file").write_text("x")
    assert generate(results, tmp) == 2
    assert capsys.readouterr().err == f"[bgpo.paper] --out {tmp} is a file, not a folder\n"
    assert generate(results, tmp / "sub") == 2 and "cannot be created" in capsys.readouterr().err


def test_repository_paper_folder_carries_the_marker() -> None:
    """`python -m bgpo.paper` (default --out paper) may rewrite the committed paper/."""
    assert (REPO_ROOT / "paper" / paper.MARKER).read_text() == paper.MARKER_TEXT
    paper.check_out(REPO_ROOT / "paper")


def test_command_line_refuses_an_out_folder_it_did_not_make(tree: tuple[Path, Path]) -> None:
    results, out = tree
    (out / "figures").mkdir()
    (out / "figures" / "plot.png").write_bytes(b"mine")
    p = subprocess.run([sys.executable, "-m", "bgpo.paper", "--results", str(results), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith(f"[bgpo.paper] --out {out}: {out / 'figures'} is not")
    assert p.stderr.count("\n") == 1 and (out / "figures" / "plot.png").read_bytes() == b"mine"


@pytest.mark.parametrize("fault", ["summary", "seed", "config", "metrics", "eval_test", "bench", "reported",
                                   "reported-layout"])
def test_unreadable_inputs_are_one_sentence(fault: str, tree: tuple[Path, Path], capsys) -> None:
    results, out = tree
    run = results / "tiny_repro" / "bgpo-countdown-mc16-s0-fixture1both0.0001"
    expected = {"summary": f"{run / 'summary.json'} is unreadable",
                "seed": f"{run / 'summary.json'} is the summary of another run (seed=7 where the run's is 0)",
                "config": f"{run / 'config.yaml'} is unreadable",
                "metrics": f"{run / 'metrics.jsonl'}:3: not a JSON row (corrupt)",
                "eval_test": f"{run / 'eval_test.json'} is unreadable",
                "bench": f"{results / 'bench' / 'memory-cpu.jsonl'}:2: not a JSON row",
                "reported": f"--reported {out / 'reported.yaml'} is unreadable",
                "reported-layout": f"--reported {out / 'reported.yaml'}: wd1.gen_length lacks 256 or 512",
                }[fault]
    if fault == "seed":  # a summary replaced by another seed's
        s = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**s, "seed": 7}))
    elif fault == "metrics":
        text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(text[:2] + [text[2][:10] + "\n"] + text[3:]))
    elif fault == "bench":
        (results / "bench" / "memory-cpu.jsonl").write_text('{"method": "bgpo"}\n{"method": \n')
    elif fault == "reported-layout":
        rep = yaml.safe_load((out / "reported.yaml").read_text())
        del rep["wd1"]["gen_length"][512]
        (out / "reported.yaml").write_text(yaml.safe_dump(rep))
    else:
        file = {"summary": run / "summary.json", "config": run / "config.yaml",
                "eval_test": run / "eval_test.json", "reported": out / "reported.yaml"}[fault]
        file.write_text(file.read_text()[:40] + "\x00 [unclosed")
    assert generate(results, out, "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[bgpo.paper] {expected}") and err.count("\n") == 1, err
    assert not (out / "tables").exists()  # nothing written


def test_command_line_gives_one_sentence_for_garbage_reported(tree: tuple[Path, Path]) -> None:
    results, out = tree
    garbage = out / "garbage.yaml"
    garbage.write_text("table1: {rows: [1, 2\n")
    p = subprocess.run([sys.executable, "-m", "bgpo.paper", "--results", str(results), "--out", str(out),
                        "--reported", str(garbage), "--tables-only"], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"[bgpo.paper] --reported {garbage} is unreadable (")
    assert p.stderr.count("\n") == 1


def test_report_claims_section_is_the_generated_table(tmp_path: Path) -> None:
    """REPORT.md's text between the claims markers is replaced by tables/claims.md's table, the rest
    kept; a report without the markers is left alone."""
    claims = "<!-- header -->\n## The paper's claims\n\n| Claim | Verdict |\n|---|---|\n| a | b |\n"
    report = tmp_path / "REPORT.md"
    report.write_text(f"# Report\n\nintro\n{paper.CLAIMS_BEGIN}\nold table\n{paper.CLAIMS_END}\n\nafter\n")
    new = paper.with_claims(report, claims)
    assert new == (f"# Report\n\nintro\n{paper.CLAIMS_BEGIN}\n| Claim | Verdict |\n|---|---|\n| a | b |\n"
                   f"{paper.CLAIMS_END}\n\nafter\n")
    assert paper.with_claims(report, claims) == paper.with_claims(report, claims)
    report.write_text("# Report without markers\n")
    assert paper.with_claims(report, claims) is None
    assert paper.with_claims(tmp_path / "absent.md", claims) is None


def test_equal_memory_table_figure_and_claim(tree: tuple[Path, Path]) -> None:
    """Issue 22.4: with tiny_equal_memory runs the table has a row per method (BGPO borrowed from
    tiny_repro at n_t 16), the figure is drawn beside the memory each used, and the claim has its
    paired intervals."""
    results, out = tree
    for method in ("vrpo", "diffugrpo", "wd1"):
        for seed in range(3):
            write_run(results, "tiny_equal_memory", method, "countdown", 2, seed, 0.4, sources=("own", "d1"))
    assert generate(results, out) == 0
    eq = (out / "tables" / "equal_memory.md").read_text()
    for name in ("BGPO", "VRPO-OL", "diffu-GRPO", "wd1"):
        cells = row(eq, "Countdown · suite test set", name)
        assert "–" not in cells[2:5], cells
    assert value(row(eq, "Countdown · suite test set", "VRPO-OL")[4]) == 40.0
    assert (out / "figures" / "equal_memory.png").stat().st_size > 1000
    assert "`equal_memory`: not drawn" not in (out / "figures" / "README.md").read_text()
    claims = (out / "tables" / "claims.md").read_text()
    line = next(x for x in claims.splitlines() if x.startswith("| BGPO beats the baselines at equal memory"))
    assert "not yet run" not in line and "BGPO − VRPO-OL (n_t 2) +" in line


def test_equal_memory_figure_draws_the_budget_and_marks_missing_rows() -> None:
    import matplotlib.pyplot as plt

    from bgpo import paper_figures as pf
    from bgpo.stats import Interval

    mem = [{"device": "cpu", "model": "tiny", "method": m, "mc": mc, "peak_bytes": b * 2**20, "overrides": []}
           for m, mc, b in (("bgpo", 16, 100), ("vrpo", 2, 200), ("diffu_grpo", 2, 199))]
    points = [(name, Interval(0.5, 0.4, 0.6, 40, 3)) for name in ("BGPO (n_t 16)", "VRPO-OL (n_t 2)",
                                                          "diffu-GRPO (n_t 2)", "wd1 (n_t 2)")]
    fig = pf.equal_memory(points, None, [("bgpo", 16), ("vrpo", 2), ("diffugrpo", 2), ("wd1", 2)], mem)
    ax = fig.axes[1]
    heights = [b.get_height() for b in ax.patches]
    assert heights[:3] == [100, 200, 199] and heights[3] != heights[3]  # wd1 has no row: NaN, marked
    assert [t.get_text() for t in ax.texts] == ["not measured"]
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [200]  # the budget: VRPO-OL at n_t 2
    plt.close(fig)
