"""Packaging (issue 16.5): licence and citation, pyproject metadata, dependency bounds that the
installed versions satisfy, and `nox` with no arguments needing nothing outside the test extra."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# packages whose internals or fast-moving APIs the code uses: each needs an upper bound
BOUNDED = ("torch", "transformers", "accelerate", "lm-eval", "hydra-core", "hydra-submitit-launcher",
           "submitit", "peft", "datasets", "evaluate")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(*extras: str) -> list[Requirement]:
    reqs = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return [Requirement(r) for r in reqs]


def test_licence_and_citation():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == PROJECT["license"]
    assert cff["version"] == PROJECT["version"]
    (bgpo,) = [r for r in cff["references"] if r["title"].startswith("Boundary-Guided Policy Optimization")]
    assert [a["family-names"] for a in bgpo["authors"]] == ["Lin", "Zhang", "Hou", "Li"]
    assert bgpo["year"] == 2025 and "10.48550/arXiv.2510.11683" in [i["value"] for i in bgpo["identifiers"]]
    assert {"Homepage", "Paper"} <= set(PROJECT["urls"]) and PROJECT["classifiers"] and PROJECT["keywords"]


def test_installed_versions_satisfy_the_declared_bounds():
    """Every requirement of the package and the test and track extras holds for what is installed
    (so an upper bound never excludes the versions the tests ran with), and the packages whose
    internals the code uses are bounded above."""
    reqs = requirements("test", "track")
    for req in reqs:
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} violates {req}"
    for name in BOUNDED:
        (req,) = [r for r in reqs if norm(r.name) == name]
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req}: no upper bound"


def default_session_modules() -> dict[str, list[str]]:
    """``nox.options.sessions`` of noxfile.py and, per session, the modules it runs with
    ``sys.executable -m <module>`` (the only kind of command a default session may run)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    (defaults,) = [ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and ast.unparse(n.targets[0]) == "nox.options.sessions"]
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    out = {}
    for name in defaults:
        calls = [c for c in ast.walk(functions[name]) if isinstance(c, ast.Call)
                 and ast.unparse(c.func).startswith("session.")]
        assert all(ast.unparse(c.func) == "session.run" for c in calls), f"{name}: only session.run"
        modules = []
        for c in calls:
            args = [ast.unparse(a) for a in c.args]
            assert args[:2] == ["sys.executable", "'-m'"], f"{name}: {args} is not `python -m ...`"
            modules.append(ast.literal_eval(c.args[2]))
        out[name] = modules
    return out


def test_default_nox_sessions_need_only_the_test_extra():
    sessions = default_session_modules()
    assert sessions == {"lint": ["ruff"], "tests": ["pytest"]}
    allowed = {norm(r.name) for r in requirements("test")}
    dists = importlib.metadata.packages_distributions()
    for name, modules in sessions.items():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"nox -s {name}: {module} not installed"
            in_extra = {norm(d) for d in dists[module]} & allowed
            assert in_extra, f"nox -s {name}: {module} not in the test extra"
    listed = subprocess.run([sys.executable, "-m", "nox", "--list"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    marked = [line.split()[1] for line in listed.stdout.splitlines() if line.startswith("* ")]
    assert sorted(marked) == sorted(sessions)  # what nox itself selects by default


def test_nox_lint_passes():
    """`nox -s lint` (the first default session) runs ruff on the repository: lint-clean."""
    lint = subprocess.run([sys.executable, "-m", "nox", "-s", "lint"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert lint.returncode == 0, (lint.stdout + lint.stderr)[-4000:]


# ---- presets in the wheel, console scripts, --help (issue 26) -------------------------------------
SCRIPTS = {"bgpo-train": "bgpo.train:main", "bgpo-sweep": "bgpo.sweep:main",
           "bgpo-pretrain": "bgpo.pretrain:main", "bgpo-eval": "bgpo.evaluate:main",
           "bgpo-export": "bgpo.export:main", "bgpo-paper": "bgpo.paper:main",
           "bgpo-lm-eval": "bgpo.lm_eval_cli:main"}


def test_help_lists_the_suite_s_groups_only():
    out = subprocess.run([sys.executable, "-m", "bgpo.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    groups = re.findall(r"^(\w+): ", out.split("== Config ==")[0], re.M)
    assert groups == ["method", "model", "sweeps", "task"], out[:800]


def test_the_wheel_ships_the_presets_and_the_console_scripts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"pip wheel could not build here: {proc.stderr[-300:]}")
    (wheel,) = tmp_path.glob("bgpo_suite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    presets = {Path(n).name for n in names if n.startswith("bgpo/presets/sweeps/")}
    assert presets == {p.name for p in (ROOT / "sweeps").glob("*.yaml")}
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry
    assert not any(n.startswith(("results/", "paper/", "tests/")) for n in names)
