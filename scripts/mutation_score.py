"""The mutation score by file from mutmut's results (``mutants/*.meta``), as README's table.

    python scripts/mutation_score.py --export results/mutation/mutmut.json   # after `nox -s mutation`
    python scripts/mutation_score.py --results results/mutation/mutmut.json \
        --recheck results/mutation/recheck.txt                               # README's table

A mutant is killed when a selected test failed (exit code 1), survived when every test passed
(0), "no tests" when none covers it (33), not run when mutmut has not reached it yet. Mutants
listed in the equivalent file (one mutmut name per line, then `#` and the reason) are counted apart:
the score is killed / (mutants run − equivalent). A re-check file (``name exit-code`` lines, from
``scripts/mutation_recheck.sh``: each survivor applied alone and the tests added since the run
executed against it) turns a survivor with a non-zero exit code into "killed by a later test".
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def results(root: Path = Path("mutants")) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in sorted(root.rglob("*.meta")):
        out.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return out


def file_of(name: str) -> str:
    """``bgpo.elbo.x__ar__mutmut_4`` → ``bgpo/elbo.py``."""
    parts = name.split(".")
    head = [p for p in parts if not p.startswith(("x_", "xǁ"))]
    return "/".join(head) + ".py"


def equivalents(path: Path | None) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition("#")
            out[name.strip()] = why.strip()
    return out


def recheck(path: Path | None) -> dict[str, int]:
    if path is None or not path.is_file():
        return {}
    return {n: int(c) for n, c in (ln.split() for ln in path.read_text().splitlines() if ln.count(" ") == 1)}


def table(res: dict[str, int | None], equiv: dict[str, str], later: dict[str, int] | None = None) -> str:
    by: dict[str, Counter] = defaultdict(Counter)
    for name, code in res.items():
        kind = {1: "killed", 0: "survived", 33: "no tests", None: "not run"}.get(code, f"exit {code}")
        if kind in ("survived", "no tests") and name in equiv:
            kind = "equivalent"
        elif kind in ("survived", "no tests") and (later or {}).get(name, 0) != 0:
            kind = "killed later"
        by[file_of(name)][kind] += 1
    lines = ["| file | mutants | killed | killed by a later test | equivalent | survived | no tests "
             "| not run | score |", "|---|---|---|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for f in sorted(by):
        c = by[f]
        total.update(c)
        lines.append(row(f, c))
    lines.append(row("**all**", total))
    return "\n".join(lines)


def row(name: str, c: Counter) -> str:
    n = sum(c.values())
    killed = c["killed"] + c["killed later"]
    scored = killed + c["survived"] + c["no tests"]
    score = f"{100 * killed / scored:.1f}%" if scored else "–"
    return (f"| {name} | {n} | {c['killed']} | {c['killed later']} | {c['equivalent']} | {c['survived']} | "
            f"{c['no tests']} | {c['not run']} | {score} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--equivalent", type=Path, default=ROOT / "scripts" / "mutation_equivalent.txt")
    p.add_argument("--results", type=Path, help="exit codes by mutant (--export's file) instead of mutants/")
    p.add_argument("--export", type=Path, help="write mutants/'s exit codes by mutant to this JSON file")
    p.add_argument("--recheck", type=Path, help="scripts/mutation_recheck.sh's output")
    p.add_argument("--survivors", action="store_true",
                   help="list the survivors neither equivalent nor killed later")
    a = p.parse_args()
    res = json.loads(a.results.read_text()) if a.results else results()
    if a.export:
        a.export.parent.mkdir(parents=True, exist_ok=True)
        a.export.write_text(json.dumps(res, indent=0, sort_keys=True, ensure_ascii=False) + "\n")
    equiv, later = equivalents(a.equivalent), recheck(a.recheck)
    print(table(res, equiv, later))
    if a.survivors:
        for name, code in sorted(res.items()):
            if code in (0, 33) and name not in equiv and later.get(name, 0) == 0:
                print(name)


if __name__ == "__main__":
    main()
