"""The Python API (``from bgpo import ...``): every name resolves, and the README's custom loop runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import bgpo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_exported_name_resolves():
    for name in bgpo.__all__:
        assert getattr(bgpo, name) is not None, name
    assert bgpo.BGPO.OFF_POLICY == "minibatches" and bgpo.elbo.draw is not None


def test_the_readme_custom_loop_runs_and_trains(capsys):
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", README.read_text(),
                      re.S)
    assert block, "README.md lost its api-example block"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block.group(1), "README.md:api-example", "exec"), scope)  # noqa: S102
    before = bgpo.build_tiny(seed=0).net.state_dict()
    after = scope["policy"].net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the loop updated the policy
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [x.split()[0] for x in lines] == ["0", "1"]


def test_the_readme_train_policy_example_runs(tmp_path, monkeypatch, capsys):
    """README's TRL-style block (issue 26): plain reward function, shipped tiny model, the suite's loop."""
    block = re.search(r"<!-- train-policy-example -->\n```python\n(.*?)```\n<!-- /train-policy-example -->",
                      README.read_text(), re.S)
    assert block, "README.md lost its train-policy-example block"
    monkeypatch.chdir(tmp_path)  # runs/ of the example lands here
    scope: dict = {}
    exec(compile(block.group(1), "README.md:train-policy-example", "exec"), scope)  # noqa: S102
    summary = scope["summary"]
    assert summary["steps"] == 2 and (tmp_path / "runs" / summary["run"] / "summary.json").exists()
    assert summary["run"] in capsys.readouterr().out
