"""The results store checks before it trusts (issue 15) and keys runs by their start point (16.4).

Fault injection on a complete run of the micro model (toy task): a run folder reused with another
config, a cut or corrupt metrics row (also in a complete run), a corrupt, incomplete or foreign
(another seed's) summary, a corrupt checkpoint, another run's checkpoint, one without a run key,
and non-finite values in training. Each case must lose no valid data (the re-run ends with exactly the
metrics of an uninterrupted run) and never finalise a run wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import bgpo.results
import bgpo.train
import bgpo.update
from bgpo.config import ConfigError, to_container
from bgpo.results import (
    COMPLETE_FIELDS,
    BaseModelMissing,
    RunFailed,
    StoreMismatch,
    base_model_identity,
    folder_hash,
    run_dir_of,
)
from bgpo.train import run
from tests.helpers import micro_model
from tests.test_trainer import cfg_of, metrics

STEPS = 4  # checkpoints at steps 2 and 4: last.pt = 4, prev.pt = 2
ARGS = ("method=bgpo", f"steps={STEPS}", "ckpt_every=2", "eval_every=2", "temperature=1.0")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


@pytest.fixture(scope="module")
def reference(base_model, tmp_path_factory) -> Path:
    """An uninterrupted run: its folder."""
    root = tmp_path_factory.mktemp("reference")
    summary = run(cfg_of(base_model, root, *ARGS))
    return root / summary["run"]


def copy_of(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run in a fresh results_dir: (results_dir, run folder)."""
    shutil.copytree(reference, tmp_path / reference.name)
    return tmp_path, tmp_path / reference.name


def final(run_dir: Path) -> dict:
    """The summary's test results (final and validation-selected policy) and the selected step."""
    s = json.loads((run_dir / "summary.json").read_text())
    return {"final": s["final"], "selected": s["selected"], "best_step": s["best_step"]}


def rewrite_line(file: Path, step: int, text: str) -> None:
    lines = file.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == step)
    lines[i] = text
    file.write_text("".join(lines))


# ---- a run folder of another config ---------------------------------------------------------
def test_run_dir_reused_with_another_config_fails_naming_the_keys(reference, base_model, tmp_path):
    root, d = copy_of(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"another config .*method\._target_: 'bgpo\.objective\.BGPO' -> "
                                          r"'baselines\.vrpo\.VRPO'"):
        run(cfg_of(base_model, root, *ARGS, "method=vrpo", f"run_dir={d}"))
    (d / "summary.json").unlink()  # incomplete: it must not resume another method's checkpoint either
    del before["summary.json"]
    with pytest.raises(ConfigError, match="mc: 2 -> 3"):
        run(cfg_of(base_model, root, *ARGS, "mc=3", f"run_dir={d}"))
    assert {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    # the same config in that folder resumes it (and completes it: the checkpoint is at the end)
    assert run(cfg_of(base_model, root, *ARGS, f"run_dir={d}"))["run"] == d.name


# ---- metrics.jsonl --------------------------------------------------------------------------
@pytest.mark.parametrize("step,resume", [(4, [2]), (3, [2]), (1, [])],
                         ids=["last row cut by a kill", "middle row corrupt", "early row corrupt: restart"])
def test_bad_metrics_row_resumes_from_a_checkpoint_it_covers(step, resume, reference, base_model,
                                                             tmp_path, caplog):
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()  # e.g. killed between the last checkpoint and the summary
    line = next(x for x in (d / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] == step)
    torn = step == STEPS  # the last line, unfinished: what a kill leaves (no newline)
    rewrite_line(d / "metrics.jsonl", step, line[: len(line) // 2] + ("" if torn else "\n"))
    summary = run(cfg_of(base_model, root, *ARGS))
    err = caplog.text
    assert f"{d / 'checkpoints' / 'last.pt'} (step {STEPS}) is not used" in err  # it needs that row
    if not torn:  # a corrupt row is named (file:line) and the file kept as evidence
        assert f"{d / 'metrics.jsonl'}:{step + 1}: not a JSON row" in err
        assert (d / "metrics.jsonl.corrupt").exists()
    assert (d / "metrics.jsonl.corrupt").exists() != torn
    assert metrics(d) == metrics(reference)  # every valid row there, the rest recomputed exactly
    assert summary["resumed_at"] == resume and final(d) == final(reference)


# ---- summary.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["{\"run\": \"x\", \"fin", "{}", "[]", "no-final"])
def test_incomplete_or_corrupt_summary_is_not_complete(content, reference, base_model, tmp_path, caplog):
    root, d = copy_of(reference, tmp_path)
    if content == "no-final":  # every field but an empty final evaluation
        s = json.loads((d / "summary.json").read_text())
        content = json.dumps({**s, "final": {}})
    (d / "summary.json").write_text(content)
    summary = run(cfg_of(base_model, root, *ARGS))
    assert f"{d / 'summary.json'}: not the summary of a complete run" in caplog.text
    assert (d / "summary.json.corrupt").read_text() == content
    assert summary["resumed_at"] == [STEPS] and final(d) == final(reference)  # re-finalised, nothing trained
    assert metrics(d) == metrics(reference)
    assert all(k in json.loads((d / "summary.json").read_text()) for k in COMPLETE_FIELDS)


# ---- checkpoints ----------------------------------------------------------------------------
def test_wall_time_adds_up_over_sittings(reference, base_model, tmp_path):
    """Issue 22.2: every checkpoint records the run's seconds so far; a resumed run's summary counts
    its earlier sittings up to the checkpoint it resumed from (``wall_s_all_sittings``). A checkpoint
    written before that was recorded gives None, and ``bgpo.claims.run_seconds`` pieces the time
    together from this sitting's seconds and the logged step times up to the resume point."""
    from bgpo.claims import run_seconds

    ref = json.loads((reference / "summary.json").read_text())
    assert ref["wall_s_all_sittings"] == pytest.approx(ref["wall_s_this_session"], abs=0.2)
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()
    (d / "checkpoints" / "last.pt").unlink()  # resume from prev.pt (step 2)
    before = torch.load(d / "checkpoints" / "prev.pt", weights_only=False)["wall_s"]
    assert 0 < before < ref["wall_s_this_session"]
    s = run(cfg_of(base_model, root, *ARGS))
    assert s["resumed_at"] == [2]
    assert s["wall_s_all_sittings"] == pytest.approx(before + s["wall_s_this_session"], abs=0.2)
    assert run_seconds(d) == (s["wall_s_all_sittings"], False)
    # the same run resumed from a checkpoint of an older commit, which did not record its time
    root, d = copy_of(reference, tmp_path / "old")
    (d / "summary.json").unlink()
    (d / "checkpoints" / "last.pt").unlink()
    prev = torch.load(d / "checkpoints" / "prev.pt", weights_only=False)
    torch.save({k: v for k, v in prev.items() if k != "wall_s"}, d / "checkpoints" / "prev.pt")
    s = run(cfg_of(base_model, root, *ARGS))
    assert s["resumed_at"] == [2] and s["wall_s_all_sittings"] is None
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    logged = sum(r["time/step_s"] for r in rows if r["step"] <= 2)
    assert run_seconds(d) == (pytest.approx(s["wall_s_this_session"] + logged), True)


@pytest.mark.parametrize("which", ["last", "both"])
def test_corrupt_checkpoint_falls_back_to_the_previous_or_restarts(which, reference, base_model, tmp_path,
                                                                   caplog):
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()
    last = d / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # torn
    if which == "both":
        (d / "checkpoints" / "prev.pt").write_bytes(b"not a checkpoint")
    summary = run(cfg_of(base_model, root, *ARGS))
    err = caplog.text
    assert f"{last}: unreadable checkpoint" in err and (d / "checkpoints" / "last.pt.corrupt").exists()
    assert summary["resumed_at"] == ([2] if which == "last" else [])
    assert metrics(d) == metrics(reference) and final(d) == final(reference)
    assert torch.load(last, weights_only=False)["step"] == STEPS


def test_out_of_memory_while_resuming_is_not_corruption(reference, base_model, tmp_path, monkeypatch, caplog):
    """Loading an 8B checkpoint can run out of memory: that stops the run with the error; last.pt
    and prev.pt are kept (not renamed *.corrupt, no restart from step 0), and a re-run with the
    memory resumes from last.pt."""
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()
    real_load = torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith(".pt"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(torch.OutOfMemoryError):
        run(cfg_of(base_model, root, *ARGS))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["best.pt", "last.pt", "prev.pt"]
    assert f"{d / 'checkpoints' / 'last.pt'}: could not be loaded" in caplog.text
    assert metrics(d) == metrics(reference)  # the metrics are untouched
    monkeypatch.undo()
    summary = run(cfg_of(base_model, root, *ARGS))
    assert summary["resumed_at"] == [STEPS] and metrics(d) == metrics(reference)


# ---- non-finite values ----------------------------------------------------------------------
def poison_at(monkeypatch, step: int, what: str) -> None:
    """At RL step ``step``: a NaN loss (and gradients), or a NaN parameter after the update."""
    calls = {"backward": 0, "opt": 0}
    real_backward, real_step = bgpo.update.method_backward, torch.optim.AdamW.step

    def backward(method, policy, *args):
        stats = real_backward(method, policy, *args)
        calls["backward"] += 1
        if what == "loss" and calls["backward"] == step:
            for p in policy.net.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
            stats["loss"] = math.nan
        return stats

    def opt_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["opt"] += 1
        if what == "parameter" and calls["opt"] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(math.inf)
        return out

    monkeypatch.setattr(bgpo.update, "method_backward", backward)
    monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)


@pytest.mark.parametrize("what", ["loss", "parameter"])
def test_non_finite_value_fails_the_run_and_only_an_explicit_retry_resumes(what, reference, base_model,
                                                                           tmp_path, monkeypatch, caplog):
    for mod in (bgpo.results, bgpo.train):
        monkeypatch.setattr(mod, "git_commit", lambda: "commit-A")
    poison_at(monkeypatch, 3, what)
    cfg = cfg_of(base_model, tmp_path, *ARGS)
    with pytest.raises(RunFailed, match=f"non-finite {what}.* at step 3"):
        run(cfg)
    d = tmp_path / reference.name
    failed = json.loads((d / "failed.json").read_text())
    assert failed["step"] == 3 and failed["quantity"].startswith(what) and failed["checkpoint_step"] == 2
    assert failed["commit"] == "commit-A" and not (d / "summary.json").exists()
    assert [r["step"] for r in metrics(d)] == [0, 1, 2]  # the bad step is neither logged...
    assert torch.load(d / "checkpoints" / "last.pt", weights_only=False)["step"] == 2  # ...nor saved
    monkeypatch.undo()
    for mod in (bgpo.results, bgpo.train):
        monkeypatch.setattr(mod, "git_commit", lambda: "commit-B")
    before = (d / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFailed, match="not retried: retry_failed=true"):  # reported, not skipped silently
        run(cfg)
    assert (d / "metrics.jsonl").read_bytes() == before
    summary = run(cfg_of(base_model, tmp_path, *ARGS, "retry_failed=true"))
    assert "commit commit-B; the run was trained so far with commit commit-A" in caplog.text
    assert summary["resumed_at"] == [2] and summary["commits"] == ["commit-A", "commit-B"]
    assert metrics(d) == metrics(reference) and final(d) == final(reference)
    assert not (d / "failed.json").exists() and (d / "failed.json.retried").exists()


# ---- the run key identifies the start point (issue 16.4) -------------------------------------
def test_run_key_includes_a_content_hash_of_the_base_model(tmp_path, monkeypatch):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    micro_model(seed=0, dtype=torch.float32).save(base)
    cfg = to_container(cfg_of(base, tmp_path / "r", *ARGS))
    first, ident = run_dir_of(cfg), base_model_identity(cfg)
    assert ident["sha256"] == folder_hash(base) and ident["path"] == str(base.resolve())

    def no_rehash(path):
        raise AssertionError(f"{path} re-hashed although its size and mtime did not change")

    real = bgpo.results._file_sha256
    monkeypatch.setattr(bgpo.results, "_file_sha256", no_rehash)
    assert run_dir_of(cfg) == first  # the cached per-file hashes ($BGPO_CACHE/hashes)
    monkeypatch.setattr(bgpo.results, "_file_sha256", real)
    micro_model(seed=1, dtype=torch.float32).save(base)  # other weights, same path
    assert run_dir_of(cfg) != first and run_dir_of(cfg).name.rsplit("-", 1)[0] == first.name.rsplit("-", 1)[0]
    hub = to_container(cfg_of("org/some-model", tmp_path / "r", *ARGS, "model.kind=llada"))
    assert base_model_identity(hub) == {"hub": "org/some-model"}


def test_config_and_summary_record_the_base_model(reference, base_model):
    import yaml

    ident = {"sha256": folder_hash(base_model), "path": str(base_model.resolve())}
    assert yaml.safe_load((reference / "config.yaml").read_text())["base_model"] == ident
    assert json.loads((reference / "summary.json").read_text())["base_model"] == ident


def test_validate_only_never_pretrains_and_says_the_key_is_provisional(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "empty-cache"))
    caplog.set_level(logging.INFO, logger="bgpo.train")

    def pretrains(*args, **kwargs):
        raise AssertionError("validate_only pretrained a base model")

    import bgpo.pretrain

    monkeypatch.setattr(bgpo.pretrain, "_build", pretrains)
    cfg = to_container(cfg_of(tmp_path, tmp_path / "r", *ARGS))
    cfg["model"]["path"], cfg["model"]["base"], cfg["task"]["name"] = None, "cache", "countdown"
    with pytest.raises(BaseModelMissing):
        run_dir_of(cfg)
    from hydra import compose, initialize_config_module

    with initialize_config_module("bgpo.conf", version_base="1.3"):
        out = run(compose("train", overrides=[f"results_dir={tmp_path / 'r'}", "validate_only=true",
                                              "model.base=cache"]))
    assert out == {"ok": True, "run_dir": None, "state": "new"}
    line = caplog.records[-1].getMessage().replace(str(tmp_path), "TMP")
    assert line.startswith("ok: run folder TMP/r/bgpo-countdown-mc8-s0-<hash> (new) (provisional:")
    assert not (tmp_path / "empty-cache" / "tiny-countdown").exists()


def test_a_run_without_test_sets_is_complete(base_model, tmp_path):
    """eval_test=false: 'final' is empty by design; such a summary still counts as complete (the
    re-run skips it), while the same empty 'final' of an eval_test=true run does not."""
    cfg = cfg_of(base_model, tmp_path, *ARGS, "eval_test=false")
    summary = run(cfg)
    assert summary["final"] == {}
    assert bgpo.results.summary_problem(summary, to_container(cfg)) is None
    assert bgpo.results.summary_problem(summary, {**to_container(cfg), "eval_test": True})
    d = tmp_path / summary["run"]
    before = (d / "summary.json").read_bytes()
    assert run(cfg) == json.loads(before) and (d / "summary.json").read_bytes() == before


# ---- identity, not only shape (issue 23, item 5) ---------------------------------------------
@pytest.fixture(scope="module")
def other_seed(base_model, tmp_path_factory) -> Path:
    """The same run with another seed: its folder (a summary and checkpoints of ANOTHER run)."""
    root = tmp_path_factory.mktemp("other")
    summary = run(cfg_of(base_model, root, *ARGS, "seed=1"))
    return root / summary["run"]


def test_checkpoints_record_their_run_key_and_step(reference):
    for name, step in (("last.pt", STEPS), ("prev.pt", 2)):
        state = torch.load(reference / "checkpoints" / name, weights_only=False)
        assert state["run"] == reference.name and state["step"] == step
    assert torch.load(reference / "checkpoints" / "best.pt", weights_only=False)["run"] == reference.name


def test_summary_of_another_seed_is_not_complete(reference, other_seed, base_model, tmp_path, caplog):
    root, d = copy_of(reference, tmp_path)
    foreign = (other_seed / "summary.json").read_text()
    (d / "summary.json").write_text(foreign)  # complete and well-formed, but another run's
    assert bgpo.results.read_summary(d, write=False) is None  # against the folder's config.yaml too
    summary = run(cfg_of(base_model, root, *ARGS))
    why = f"run='{other_seed.name}' where the run's is '{d.name}', seed=1 where the run's is 0"
    assert f"{d / 'summary.json'}: not the summary of a complete run (the summary of another run ({why}))" \
        in caplog.text
    assert (d / "summary.json.corrupt").read_text() == foreign  # kept as evidence
    assert summary["seed"] == 0 and summary["resumed_at"] == [STEPS] and final(d) == final(reference)
    assert metrics(d) == metrics(reference)


def test_checkpoint_of_another_run_is_refused(reference, other_seed, base_model, tmp_path):
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()  # incomplete: it would resume from last.pt
    last = d / "checkpoints" / "last.pt"
    shutil.copy(other_seed / "checkpoints" / "last.pt", last)
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(StoreMismatch) as err:
        run(cfg_of(base_model, root, *ARGS))
    assert str(err.value) == (f"{last} is a checkpoint of run {other_seed.name}, not of this run {d.name}: "
                              "it is not used; move it away")
    assert isinstance(err.value, ConfigError)  # the command line: this sentence, exit code 2
    after = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing set aside, rewritten or trained


def test_checkpoint_without_a_run_key_is_used_with_a_warning(reference, base_model, tmp_path, caplog):
    """Checkpoints written before they carried a run key: resumed from (nothing is recomputed), with
    a warning that their run cannot be verified; the checkpoints written after it record the key."""
    root, d = copy_of(reference, tmp_path)
    (d / "summary.json").unlink()
    for name in ("last.pt", "prev.pt"):
        path = d / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        del state["run"]
        torch.save(state, path)
    line = next(x for x in (d / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] == 3)
    rewrite_line(d / "metrics.jsonl", 3, line[:10] + "\n")  # last.pt (step 4) is not usable: prev.pt is
    summary = run(cfg_of(base_model, root, *ARGS))
    prev = d / "checkpoints" / "prev.pt"
    assert f"{prev} records no run key (written before checkpoints carried one): used" in caplog.text
    assert summary["resumed_at"] == [2] and metrics(d) == metrics(reference) and final(d) == final(reference)
    assert torch.load(d / "checkpoints" / "last.pt", weights_only=False)["run"] == d.name
    assert not list(d.rglob("*.unverified"))


@pytest.mark.parametrize("step", [3, STEPS], ids=["middle row cut", "last row cut, no newline"])
def test_cut_row_in_a_complete_run_is_reported_and_recomputed(step, reference, base_model, tmp_path, caplog):
    root, d = copy_of(reference, tmp_path)
    file = d / "metrics.jsonl"
    line = next(x for x in file.read_text().splitlines() if json.loads(x)["step"] == step)
    rewrite_line(file, step, line[: len(line) // 2] + ("" if step == STEPS else "\n"))
    assert bgpo.results.read_summary(d, write=False) is None  # the summary alone does not make it complete
    summary = run(cfg_of(base_model, root, *ARGS))
    why = "not a JSON row (corrupt)" if step < STEPS else "a row cut mid-line (no newline at the end)"
    assert f"{d / 'summary.json'}: its metrics are damaged ({file}:{step + 1}: {why})" in caplog.text
    assert (d / "summary.json.unverified").exists()
    assert summary["resumed_at"] == [2] and metrics(d) == metrics(reference) and final(d) == final(reference)
