"""The mutation score by file from mutmut's results (``mutants/*.meta``), as README's table.

    python scripts/mutation_score.py [--equivalent scripts/mutation_equivalent.txt]

A mutant is killed when a selected test failed (exit code 1), survived when every test passed
(0), "no tests" when none covers it (33), not run when mutmut has not reached it yet. Mutants
listed in the equivalent file (one mutmut name per line, then `#` and the reason) are counted apart:
the score is killed / (mutants run − equivalent).
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


def table(res: dict[str, int | None], equiv: dict[str, str]) -> str:
    by: dict[str, Counter] = defaultdict(Counter)
    for name, code in res.items():
        kind = {1: "killed", 0: "survived", 33: "no tests", None: "not run"}.get(code, f"exit {code}")
        if kind == "survived" and name in equiv:
            kind = "equivalent"
        by[file_of(name)][kind] += 1
    lines = ["| file | mutants | killed | equivalent | survived | no tests | not run | score |",
             "|---|---|---|---|---|---|---|---|"]
    total: Counter = Counter()
    for f in sorted(by):
        c = by[f]
        total.update(c)
        lines.append(row(f, c))
    lines.append(row("**all**", total))
    return "\n".join(lines)


def row(name: str, c: Counter) -> str:
    n = sum(c.values())
    scored = c["killed"] + c["survived"] + c["no tests"]
    score = f"{100 * c['killed'] / scored:.1f}%" if scored else "–"
    return (f"| {name} | {n} | {c['killed']} | {c['equivalent']} | {c['survived']} | {c['no tests']} | "
            f"{c['not run']} | {score} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--equivalent", type=Path, default=ROOT / "scripts" / "mutation_equivalent.txt")
    p.add_argument("--survivors", action="store_true", help="list the survivors not marked equivalent")
    a = p.parse_args()
    res, equiv = results(), equivalents(a.equivalent)
    print(table(res, equiv))
    if a.survivors:
        for name, code in sorted(res.items()):
            if code == 0 and name not in equiv:
                print(name)


if __name__ == "__main__":
    main()
