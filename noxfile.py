"""nox sessions. They run in the current environment (python=False) so that they work offline
and use the torch already installed (a fresh venv would pull a multi-GB CUDA build)."""

from __future__ import annotations

import sys

import nox

nox.options.default_venv_backend = "none"
# `nox` with no arguments: lint, then the tests. Both need only the test extra (ruff is in it), so
# they run after README's install (pip install torch==2.13.0 -e ".[test]"); tests/test_packaging.py
# checks that every default session needs nothing else.
nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite (what .ci/run runs)."""
    session.run(sys.executable, "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff (pyproject.toml [tool.ruff]); installed by the test extra."""
    session.run(sys.executable, "-m", "ruff", "check", ".")


@nox.session(python=False)
def pretrain(session: nox.Session) -> None:
    """Pretrain both tiny base models (Countdown, Sudoku) into $BGPO_CACHE."""
    for task in ("countdown", "sudoku"):
        session.run(sys.executable, "-m", "bgpo.pretrain", f"task={task}", *session.posargs)


@nox.session(python=False)
def reproduce_tables(session: nox.Session) -> None:
    """results/ → paper/ tables and figures (offline, seconds).

    `nox -s reproduce_tables -- --check` only compares the committed paper/tables/* with a
    regeneration; `-- --tables-only` skips the figures."""
    session.run(sys.executable, "-m", "bgpo.paper", *session.posargs)


TINY_PRESETS = ("tiny_quick", "tiny_repro", "tiny_offpolicy", "tiny_mc", "tiny_bounds", "tiny_equal_memory",
                "beyond_tiny")


@nox.session(python=False)
def sweep_tiny(session: nox.Session) -> None:
    """The CPU reproduction (sweeps/tiny_*.yaml, beyond_tiny) into results/, two one-thread runs at a
    time; resumable (complete runs are skipped). `nox -s sweep_tiny -- tiny_quick` runs one preset.
    The trainer pretrains the two tiny base models first if they are missing. Then run
    `nox -s reproduce_tables`."""
    for preset in session.posargs or TINY_PRESETS:
        session.run(sys.executable, "-m", "bgpo.sweep", "-m", f"+sweeps={preset}",
                    "hydra/launcher=local_parallel", "threads=1", env={"OMP_NUM_THREADS": "1"})


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Benchmarks into results/bench/ (memory, rollout; `-- variance` picks others)."""
    for name in session.posargs or ["memory", "rollout"]:
        session.run(sys.executable, "-m", "bgpo.bench", name)


@nox.session(python=False)
def mutation(session: nox.Session) -> None:
    """Mutation testing of bgpo/objective.py, bgpo/method.py, bgpo/elbo.py and baselines/ (mutmut,
    configured in pyproject.toml; hours on 2 cores, resumable). Then `mutmut results` lists the
    survivors (README, "Mutation testing", says what has been measured)."""
    session.run(sys.executable, "-m", "mutmut", "run", *session.posargs, env={"OMP_NUM_THREADS": "1"})
    session.run(sys.executable, "-m", "mutmut", "results")


@nox.session(python=False)
def dryrun(session: nox.Session) -> None:
    """Every job of the full-scale presets (paper_main, paper_mc_ablation) in miniature on the CPU:
    native LLaDA, bf16-mixed, FSDP over 2 processes, checkpoints, evaluation, export (bgpo/dryrun.py).
    `nox -s dryrun -- --select method=bgpo,task=math` runs a sample."""
    session.run(sys.executable, "-m", "bgpo.dryrun", *session.posargs)


@nox.session(python=False)
def gpu_check(session: nox.Session) -> None:
    """On one CUDA GPU, under 8 minutes: bf16 matmul speed, the LLaDA-8B-shaped memory curve in
    bf16-mixed (BGPO, VRPO-OL), the floor with activation checkpointing, a short RL job; rows in
    results/bench/ (bgpo/gpu_check.py). Refuses without CUDA; `-- --dry` runs it on the CPU."""
    session.run(sys.executable, "-m", "bgpo.gpu_check", *session.posargs)
