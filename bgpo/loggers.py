"""Metric trackers: TensorBoard and Weights & Biases beside ``metrics.jsonl`` (``logger.*``).

    python -m bgpo.train 'logger.backends=[tensorboard,wandb]'   # W&B: $WANDB_MODE, else offline
    tensorboard --logdir results/                                 # every run's <run_dir>/tb/
    wandb sync results/<run>/wandb/offline-run-*                  # upload an offline run later

``metrics.jsonl`` stays the record of the results store (README "The results store"); a tracker
is a view of the same rows — every row the trainer writes, validation rows included, the test
sets (``test/<source>/*`` of the base model at step 0, of the final and the validation-selected
policy, ``test_selected/<source>/*``, at the last step: ``eval_test.json``), and pretraining's
loss and final validation — plus the run's resolved config (TensorBoard: the HPARAMS tab and a
text summary; W&B: ``config=``). How a run is observed is not what it computes: ``logger`` is one
of ``bgpo.results.NON_IDENTITY_KEYS``, so it never changes the run key.

Log folders live in the run folder (``tb/``, ``wandb/``; git-ignored). A resumed run continues
them: TensorBoard drops the steps after the checkpoint that an earlier attempt had logged
(``purge_step``), W&B resumes the run whose id is the run folder's name plus a hash of its path
(the same config trained into ``results/`` and ``runs/`` is two runs). A run that starts from
step 0 starts new local logs, as it starts a new ``metrics.jsonl`` (an online W&B run of the same
id keeps the steps it already has: W&B ignores steps that do not increase). Only rank 0 opens
backends.

Besides the trackers, the rows become INFO lines of Python logging (step, reward, loss,
validation accuracy) every ``logger.log_every`` steps and at every validation, so that Hydra's job log
(``<results_dir>/.hydra/run/train.log``, ``.hydra/sweep/<job>/sweep.log``) records the run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig

if TYPE_CHECKING:  # a type only: bgpo.validate imports this module to check logger.*
    from bgpo.config import LoggerConf

WANDB_MODES = ("offline", "online", "disabled")


def wandb_settings(conf: LoggerConf | DictConfig, root: Path) -> dict[str, str]:
    """W&B's own environment conventions unless a ``logger.*`` key is set: ``logger.project``, else
    ``$WANDB_PROJECT``, else bgpo; ``logger.wandb_mode``, else ``$WANDB_MODE``, else offline; the
    logs in ``$WANDB_DIR`` when set, else the run folder."""
    return {"project": conf.project or os.environ.get("WANDB_PROJECT") or "bgpo",
            "mode": conf.wandb_mode or os.environ.get("WANDB_MODE") or "offline",
            "dir": os.environ.get("WANDB_DIR") or str(root)}
# the INFO line's keys, in this order, when the row has them (trainer and pretraining rows)
LINE_KEYS = ("reward", "loss", "kl", "grad_norm", "val/accuracy", "val/reward", "time/step_s")
# TensorBoard's HPARAMS tab: the metrics shown beside each run's config (absent ones stay empty)
HPARAM_METRICS = ("val/accuracy", "val/reward", "reward", "loss")


class Backend(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """``<root>/tb/``: one scalar per metric and step (flushed every row, so a killed run keeps
    what it logged); on a fresh start the config as hparams and as a YAML text summary."""

    def __init__(self, root: Path, config: dict[str, Any], name: str, start: int | None,
                 conf: LoggerConf | DictConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root / "tb"), purge_step=start + 1 if start else None)
        if start:  # resumed: the config is already in the log
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in _flatten(config, ".")}
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        text = yaml.safe_dump(config, sort_keys=True)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
        self.writer.flush()

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """``<root>/wandb/``: a W&B run (offline by default), ``config=`` the resolved config; resumable
    runs get an id derived from the run folder and ``resume="allow"``."""

    def __init__(self, root: Path, config: dict[str, Any], name: str, start: int | None,
                 conf: LoggerConf | DictConfig) -> None:
        import wandb

        run_id = None if start is None else wandb_id(root)
        # console="off": the job log already records the console; W&B's stdout wrapper is not needed
        self.run = wandb.init(entity=conf.entity, name=name, id=run_id, resume="allow" if run_id else None,
                              config=config, reinit="finish_previous", settings=wandb.Settings(console="off"),
                              **wandb_settings(conf, root))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


# name -> (the package it needs, its class)
BACKENDS: dict[str, tuple[str, type[TensorBoard] | type[WandB]]] = {
    "tensorboard": ("tensorboard", TensorBoard), "wandb": ("wandb", WandB)}


def validate(conf: LoggerConf | DictConfig) -> None:
    """Start-up check of ``logger.*``: known backends whose package is installed, a W&B mode."""
    backends = list(conf.backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"logger.backends={backends}: unknown {unknown}; allowed: {list(BACKENDS)} "
                         "(several at once, [] for none)")
    for name in backends:
        package = BACKENDS[name][0]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"logger.backends: {name} needs the {package} package, which is not "
                             "installed: pip install 'bgpo-suite[track]'")
    mode = wandb_settings(conf, Path("."))["mode"]
    if mode not in WANDB_MODES:
        where = "logger.wandb_mode" if conf.wandb_mode else "$WANDB_MODE"
        raise ValueError(f"{where}={mode!r} is not one of {list(WANDB_MODES)}")
    if conf.log_every < 1:
        raise ValueError(f"logger.log_every={conf.log_every} must be >= 1")


def wandb_id(root: Path) -> str:
    """The W&B id of a run folder: its name and a hash of its absolute path (stable across resumes)."""
    return f"{root.name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]}"


class Tracker:
    """Fans each metrics row out to the backends, and writes an INFO line every ``log_every``
    steps, at ``total`` and at every validation row (``val/*`` keys), when the row has one of
    ``LINE_KEYS``. ``Tracker()`` does nothing (ranks other than 0)."""

    def __init__(self, backends: list[Backend] | None = None, log_every: int = 1, total: int | None = None,
                 log: logging.Logger | None = None) -> None:
        self.backends = backends or []
        self.log_every, self.total = log_every, total
        self.logger = log or logging.getLogger(__name__)
        # a run that raises (preemption, a kill in a test) still closes its writers when collected
        self._finalizer = weakref.finalize(self, _close_all, self.backends)

    @classmethod
    def open(cls, conf: LoggerConf | DictConfig, root: Path, config: dict[str, Any], start: int | None,
             total: int | None = None, log: logging.Logger | None = None, name: str | None = None) -> Tracker:
        """The backends of ``conf.backends`` writing into ``root``. ``start``: the step a resumable
        run starts from (0: fresh, earlier logs removed; k: resumed after step k); None: a run
        that never resumes (pretraining). ``name``: the run's name in W&B (default: the folder's)."""
        validate(conf)
        names = list(dict.fromkeys(conf.backends))
        if start == 0:
            for sub in ("tb", "wandb"):
                shutil.rmtree(root / sub, ignore_errors=True)
        name = name or root.name
        backends: list[Backend] = [BACKENDS[n][1](root, config, name, start, conf) for n in names]
        tracker = cls(backends, conf.log_every, total, log)
        if start:
            tracker.logger.info("resuming after step %d (its checkpoint)", start)
        if names:
            w = wandb_settings(conf, root)
            tracker.logger.info("%s: metrics also go to %s (logs in %s)", name, ", ".join(
                f"{n} ({w['mode']})" if n == "wandb" else n for n in names),
                ", ".join(str(root / "tb" if n == "tensorboard" else Path(w["dir"]) / "wandb")
                          for n in names))
        return tracker

    def log(self, row: Mapping[str, Any]) -> None:
        """One metrics row (``step`` and numbers) to every backend, and maybe an INFO line."""
        step = int(row["step"])
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for b in self.backends:
            b.log(scalars, step)
        due = any(k.startswith("val/") for k in row) or step % self.log_every == 0 or step == self.total
        if due and any(k in row for k in LINE_KEYS):
            self.logger.info(line(row, self.total))

    def close(self) -> None:
        self._finalizer()


def line(row: Mapping[str, Any], total: int | None = None) -> str:
    """``step 10/30: reward 0.2344, loss -0.01234, val/accuracy 0.2031, ...``"""
    parts = [f"{k} {row[k]:.4g}" for k in LINE_KEYS if isinstance(row.get(k), (int, float))]
    return f"step {row['step']}{f'/{total}' if total else ''}: " + ", ".join(parts)


def _close_all(backends: list[Backend]) -> None:
    for b in backends:
        b.close()


def nested(prefix: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """``nested("test", {"own": {"accuracy": 0.1}})`` → ``{"test/own/accuracy": 0.1}`` (a row's keys)."""
    return dict(_flatten(tree, "/", f"{prefix}/"))


def _flatten(d: Mapping[str, Any], sep: str, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _flatten(v, sep, f"{prefix}{k}{sep}")
        else:
            out.append((f"{prefix}{k}", v))
    return out
