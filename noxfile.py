"""nox sessions. They run in the current environment (python=False) so that they work offline
and use the torch already installed (a fresh venv would pull a multi-GB CUDA build)."""

from __future__ import annotations

import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite (what .ci/run runs)."""
    session.run(sys.executable, "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run(sys.executable, "-m", "ruff", "check", ".")


@nox.session(python=False)
def pretrain(session: nox.Session) -> None:
    """Pretrain both tiny base models (Countdown, Sudoku) into $BGPO_CACHE."""
    for task in ("countdown", "sudoku"):
        session.run(sys.executable, "-m", "bgpo.pretrain", f"task={task}", *session.posargs)
