"""``python -m bgpo.bench <name> [args]``: dispatch to ``bgpo.bench.<name>.main(argv)``.

A benchmark is any module of this package with a ``main(argv: list[str]) -> int | None``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bgpo.bench


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bgpo.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m bgpo.bench {{{','.join(names())}}} [args]   (--help after a name for its args)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in names():
        print(f"unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return importlib.import_module(f"bgpo.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
