"""Entry point of one RL run (parse and wire only):

    python -m bgpo.train method=bgpo task=countdown mc=16 steps=200
    python -m bgpo.train validate_only=true ...     # every check, "ok" and the run folder; no model

The run lives in the results store (``results_dir/<method>-<task>-mc<mc>-s<seed>-<hash>``); a
completed run is not repeated, an interrupted one resumes from its last good checkpoint, a failed
one (non-finite values: ``failed.json``) is reported and retried only with ``retry_failed=true``.
A bad setting exits with code 2 and one sentence on stderr; a failed run exits with code 1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bgpo.config import register, to_container
from bgpo.results import (
    BaseModelMissing,
    RunFailed,
    finish_run,
    git_commit,
    open_run,
    read_failure,
    record_failure,
    run_dir_of,
    run_lock,
    with_base_model,
)
from bgpo.validate import base_architecture, cli_errors, validate_train

log = logging.getLogger("bgpo.train")  # not __name__, which is "__main__" under python -m


def resolved_config(cfg: DictConfig, here: bool = True) -> dict:
    """``cfg`` validated (before any model is built; ``here``: its device must exist on this
    machine), with the architecture keys of the base model that is really trained, as a plain
    dict: what the run key and ``config.yaml`` are made of."""
    validate_train(cfg, here=here)
    for key, value in base_architecture(cfg.task.name, cfg.model).items():
        cfg.model[key] = value
    return to_container(cfg)


def run(cfg: DictConfig) -> dict:
    """Validate, then train in the results store (skip when complete). Used by train and sweep."""
    resolved = resolved_config(cfg)
    if cfg.validate_only:
        return validated(resolved)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    from bgpo.parallel import export_launcher_env
    from bgpo.pretrain import ensure_base_model
    from bgpo.trainer import NonFinite, train

    export_launcher_env()  # the tasks of one Slurm job form one process group
    if cfg.model.kind == "tiny" and not cfg.model.path:
        ensure_base_model(cfg.task, cfg.model)  # built once (locked): its hash is part of the key
    resolved = with_base_model(resolved)
    rank = int(os.environ.get("RANK", "0"))  # torchrun / accelerate: only rank 0 writes
    path, done = open_run(resolved, write=rank == 0, retry_failed=cfg.retry_failed)
    if done is not None:
        log.info(f"[bgpo] {path} is complete (summary.json exists): nothing to train")
        return done
    if rank != 0:
        try:
            return train(cfg, path)
        except NonFinite as e:
            raise RunFailed(f"{path} failed: {e}") from None
    with run_lock(path) as mine:
        if not mine:
            log.info(f"[bgpo] {path} is being trained by another process: skipped here")
            return {"run": path.name, "skipped": "locked"}
        log.info(f"[bgpo] training {path}")
        failure = read_failure(path)
        if failure is not None:  # retry_failed=true (open_run raised otherwise)
            os.replace(path / "failed.json", path / "failed.json.retried")
            log.info(f"[bgpo] {path}: retrying after a failure at step {failure.get('step')} "
                     f"({failure.get('reason')}) from its last good checkpoint")
        try:
            result = train(cfg, path)
        except NonFinite as e:
            record_failure(path, {"reason": str(e), "step": e.step, "quantity": e.quantity,
                                  "value": str(e.value), "checkpoint_step": e.checkpoint_step,
                                  "commit": git_commit()})
            raise RunFailed(f"{path} failed: {e}; failed.json written, no summary; the last good checkpoint "
                            f"is step {e.checkpoint_step} (retry_failed=true resumes from it)") from None
        summary = finish_run(path, resolved, result)
    log.info(f"[bgpo] {path}: test accuracy {test_line(summary)}")
    if (path / "eval_test.json").is_file():
        import json

        from bgpo.evaluation import describe

        for line in describe(json.loads((path / "eval_test.json").read_text())):
            log.info(f"[bgpo] {line}")
    return summary


def test_line(summary: dict) -> str:
    """``own 0.141 (n=256), d1 0.211 (n=256); selected at step 40: own 0.152, d1 0.219``."""
    def fmt(res: dict) -> str:
        return ", ".join(f"{src} {r['accuracy']:.3f} (n={r['n']})" for src, r in res.items())

    line = f"final: {fmt(summary.get('final') or {})}"
    if summary.get("selected"):
        line += f"; selected at step {summary['best_step']} on validation: {fmt(summary['selected'])}"
    return line


def run_state(resolved: dict[str, Any]) -> tuple[str, str, str]:
    """(run folder, state: new | resumes | complete | failed, a note): what a start would do with
    ``resolved``, nothing built. When the tiny base model is not built yet the folder is
    provisional: its hash completes the run key, and nothing here pretrains."""
    from bgpo.results import check_stored_config, read_summary, run_name

    try:
        resolved, note = with_base_model(resolved), ""
    except BaseModelMissing as e:
        note = f" (provisional: {e}; the first run pretrains it and its hash completes the run key)"
        if not resolved.get("run_dir"):
            name = run_name({**resolved, "base_model": {}}).rsplit("-", 1)[0] + "-<hash>"
            return f"{resolved['results_dir']}/{name}", "new", note
    path = run_dir_of(resolved)
    if "base_model" in resolved:
        check_stored_config(path, resolved)
    state = ("complete" if read_summary(path, resolved, write=False) is not None
             else "failed" if read_failure(path) is not None
             else "resumes" if (path / "checkpoints").exists() else "new")
    return str(path), state, note


def validated(resolved: dict[str, Any]) -> dict[str, Any]:
    """``validate_only=true``: print "ok", the run folder the run would use and its state."""
    path, state, note = run_state(resolved)
    log.info(f"ok: run folder {path} ({state}){note}")
    return {"ok": True, "run_dir": None if "<hash>" in path else path, "state": state}


def measured_minutes(resolved: dict[str, Any], store: Path = Path("results")) -> tuple[float, int] | None:
    """(median one-thread minutes, number of runs) of the committed runs of the same method, task,
    model kind and generation length (and n_t, when such runs exist), scaled to this run's steps;
    None when there are none."""
    import json
    import statistics

    import yaml

    per_step = []
    for summary in store.glob("*/*/summary.json"):
        try:
            s = json.loads(summary.read_text())
            c = yaml.safe_load((summary.parent / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        same = (c.get("method", {}).get("_target_") == resolved["method"]["_target_"]
                and c.get("task", {}).get("name") == resolved["task"]["name"]
                and c.get("task", {}).get("gen_length") == resolved["task"]["gen_length"]
                and c.get("model", {}).get("kind") == resolved["model"]["kind"])
        if same and not s.get("resumed_at") and isinstance(s.get("wall_s_this_session"), (int, float)):
            per_step.append((c.get("mc") == resolved["mc"],
                             s["wall_s_this_session"] / 60 / max(int(s.get("steps", 1)), 1)))
    same_mc = [m for same, m in per_step if same]
    chosen = same_mc or [m for _, m in per_step]
    if not chosen:
        return None
    return statistics.median(chosen) * int(resolved["steps"]), len(chosen)


register()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("bgpo.train"):
        try:
            run(cfg)
        except RunFailed as e:
            print(f"[bgpo.train] {e}", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
