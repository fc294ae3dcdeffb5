"""Entry point of one RL run (parse and wire only):

    python -m bgpo.train method=bgpo task=countdown mc=16 steps=200

The run lives in the results store (``results_dir/<method>-<task>-mc<mc>-s<seed>-<hash>``); a
completed run is not repeated, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from bgpo.config import register, to_container, validate_train
from bgpo.results import finish_run, open_run, run_lock

log = logging.getLogger("bgpo.train")  # not __name__, which is "__main__" under python -m


def run(cfg: DictConfig) -> dict:
    """Validate, then train in the results store (skip when complete). Used by train and sweep."""
    validate_train(cfg)  # before any model is built
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    from bgpo.parallel import export_launcher_env
    from bgpo.trainer import train

    export_launcher_env()  # the tasks of one Slurm job form one process group

    resolved = to_container(cfg)
    rank = int(os.environ.get("RANK", "0"))  # torchrun / accelerate: only rank 0 writes
    path, done = open_run(resolved, write=rank == 0)
    if done is not None:
        log.info(f"[bgpo] {path} is complete (summary.json exists): nothing to train")
        return done
    if rank != 0:
        return train(cfg, path)
    with run_lock(path) as mine:
        if not mine:
            log.info(f"[bgpo] {path} is being trained by another process: skipped here")
            return {"run": path.name, "skipped": "locked"}
        log.info(f"[bgpo] training {path}")
        summary = finish_run(path, resolved, train(cfg, path))
    log.info(f"[bgpo] {path}: test accuracy {test_line(summary)}")
    return summary


def test_line(summary: dict) -> str:
    """``own 0.141 (n=256), d1 0.211 (n=256); selected at step 40: own 0.152, d1 0.219``."""
    def fmt(res: dict) -> str:
        return ", ".join(f"{src} {r['accuracy']:.3f} (n={r['n']})" for src, r in res.items())

    line = f"final: {fmt(summary.get('final') or {})}"
    if summary.get("selected"):
        line += f"; selected at step {summary['best_step']} on validation: {fmt(summary['selected'])}"
    return line


register()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
