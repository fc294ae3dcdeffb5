"""Pretraining the embedded tiny dLLM: masked-diffusion SFT (LLaDA's SFT loss; docs/methods.md §1–§2).

    python -m bgpo.pretrain task=countdown        # then task=sudoku

The prompt is never masked; ``t ~ U(0,1]`` masks each completion token (EOS padding included)
with probability t; loss = Σ_masked −log p / t, divided by the completion length — i.e. one
time-level draw of the shared ELBO sampler, scaled by 1/L. Training stops deliberately short of
mastery (``steps``) so that RL has headroom; the end-of-run greedy evaluation is written to
``pretrain.json`` beside the model. With ``logger.backends=[tensorboard,wandb]`` the loss (mean
over each ``logger.log_every`` steps) and that evaluation (``val/*``) also go to
``<model folder>/tb/``, ``wandb/`` (``bgpo.loggers``).

Building a base model holds an exclusive lock (``fcntl``, ``<cache>/.tiny-<task>.lock``) shared by
every process and job on the machine or shared file system: a second process that needs the same
model waits, then uses the one the first built (issue 16.6). The model is written into a
temporary folder unique to the process and renamed into place whole.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bgpo import elbo, provision
from bgpo.config import ModelConfig, PretrainConfig, TaskConfig, register
from bgpo.elbo import Batch, ELBOConfig
from bgpo.loggers import Tracker
from bgpo.model import build_tiny
from bgpo.provision import build_lock, default_path, file_sha256, pick_device, shipped_manifest, shipped_path
from bgpo.results import atomic_write_json, provenance
from bgpo.rollout import evaluate
from bgpo.tasks import get_task
from bgpo.validate import cli_errors, validate_pretrain

log = logging.getLogger("bgpo.pretrain")  # not __name__, which is "__main__" under python -m


def pretrain(cfg: PretrainConfig | DictConfig) -> dict:
    """Train, save (model + tokenizer + pretrain.json) and return the evaluation."""
    validate_pretrain(cfg)
    if getattr(cfg, "ship", False):  # (validate_pretrain refuses ship=true with out=)
        out = provision.SHIPPED_DIR / f"tiny-{cfg.task.name}"
    else:
        out = Path(cfg.out) if cfg.out else default_path(cfg.task.name)
    with build_lock(out):
        summary = _build(cfg, out)
        if getattr(cfg, "ship", False):
            write_manifest_entry(cfg.task.name, out, summary)
        return summary


def write_manifest_entry(task_name: str, folder: Path, summary: dict, built_as: str | None = None) -> None:
    """Record a shipped base model: every file's sha256 (checked at every load), the run-key hash
    (weights + config.json), the command that rebuilds it and its measured time and accuracy
    (``built_as``: the command line that actually built it, when not the ship command itself)."""
    from bgpo.results import folder_hash

    manifest = shipped_manifest()
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest[task_name] = {
        "folder": folder.name, "files": files, "sha256": folder_hash(folder),
        "command": f"python -m bgpo.pretrain task={task_name} ship=true",
        "train_seconds": summary["train_seconds"], "total_seconds": summary["total_seconds"],
        "validation": summary["eval"], "torch": summary.get("torch"), "platform": summary.get("platform"),
        "threads": summary.get("threads", torch.get_num_threads()),
        **({"built_as": built_as} if built_as else {}),
    }
    atomic_write_json(provision.SHIPPED_DIR / "manifest.json", manifest)


def _build(cfg: PretrainConfig | DictConfig, out: Path) -> dict:
    """Pretrain and save to ``out`` (the caller holds ``build_lock(out)``)."""
    sft_elbo = ELBOConfig(mode="elbo", level=cfg.level, window="full")
    steps = cfg.steps if cfg.steps is not None else cfg.task.pretrain_steps
    device = pick_device(cfg.device)
    # the model folder appears whole or not at all; the temporary one is unique to the process
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    config = OmegaConf.to_container(OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg,
                                     resolve=True)
    # trackers write into the model folder (tb/, wandb/); pretraining never resumes
    tracker = Tracker.open(cfg.logger, tmp, config, None, steps, log, name=out.name)
    t0 = time.time()
    task = get_task(cfg.task.name, test_file=cfg.task.test_file, n_test=cfg.task.n_test,
                    **cfg.task.options)
    m = cfg.model
    model = build_tiny(seed=cfg.seed, hidden=m.hidden, layers=m.layers, heads=m.heads,
                       intermediate=m.intermediate)
    model.net.to(device).train()
    fmt = cfg.task.format
    data = task.train_examples(cfg.n_train, cfg.seed)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    slip = random.Random(f"near-miss-{cfg.seed}")
    losses: list[float] = []
    for step in (bar := tqdm(range(steps), desc=f"pretrain {cfg.task.name}")):
        lo = (step * cfg.batch_size) % len(data)
        exs = [data[order[(lo + i) % len(data)]] for i in range(cfg.batch_size)]
        prompt_ids, prompt_mask = model.encode_prompts([task.render(e, fmt) for e in exs])
        targets = [task.near_miss(e, fmt) if slip.random() < cfg.task.sft_near_miss else task.target(e, fmt)
                   for e in exs]  # a share of near misses blurs the base (task.sft_near_miss)
        comp = model.encode_completions(targets, cfg.task.gen_length)
        batch = Batch.build(prompt_ids, prompt_mask, comp, 1)
        draws = elbo.draw(batch, sft_elbo, 1, model.eos_token_id, g)
        loss = -elbo.ell(model, batch, draws, slice(0, 1)).mean() / cfg.task.gen_length
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        k = cfg.logger.log_every
        if (step + 1) % k == 0 or step + 1 == steps:  # the mean loss of the steps since the last row
            recent = losses[-(step % k + 1):]
            tracker.log({"step": step + 1, "loss": sum(recent) / len(recent)})
    train_s = time.time() - t0
    # the base model's strength is chosen on VALIDATION problems (never the test set)
    result = evaluate(model, task, task.val_examples()[: cfg.eval_n], cfg.task, progress=True)
    result = {"split": "val", **{k: v for k, v in result.items() if k != "per_problem"}}
    tracker.log({"step": steps, **{f"val/{k}": v for k, v in result.items() if k != "split"}})
    tracker.close()
    model.save(tmp)
    summary = {"task": cfg.task.name, "eval": result, "train_seconds": round(train_s, 1),
               "total_seconds": round(time.time() - t0, 1), "final_loss": losses[-1],
               "config": config, **provenance(device)}
    atomic_write_json(tmp / "pretrain.json", summary)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the model folder appears whole or not at all
    log.info(f"[pretrain] {cfg.task.name}: validation accuracy {result['accuracy']:.3f} reward "
             f"{result['reward']:.3f} on {result['n']} problems; {train_s:.0f}s training; saved to {out}"
             + (f" (tracker logs in it: {', '.join(cfg.logger.backends)})" if cfg.logger.backends else ""))
    return summary


def ensure_base_model(task: TaskConfig | DictConfig, model: ModelConfig | DictConfig) -> Path:
    """The tiny base model of ``task``: the configured path, the shipped one (``model.base=shipped``,
    hash-checked), or the cached one (``model.base=cache``), built if missing
    (with the configured tiny architecture) by exactly one process: the others wait on the lock
    and then use it."""
    if model.path:
        return Path(model.path)
    if getattr(model, "base", "cache") == "shipped" and task.name in shipped_manifest():
        return shipped_path(task.name)
    path = default_path(task.name)
    if (path / "pretrain.json").exists():
        return path
    plain = lambda c: OmegaConf.to_container(c) if isinstance(c, DictConfig) else dataclasses.asdict(c)  # noqa: E731
    cfg = PretrainConfig(task=TaskConfig(**plain(task)), model=ModelConfig(**{  # type: ignore[arg-type]
        k: v for k, v in plain(model).items() if k in ("kind", "hidden", "layers", "heads", "intermediate")}))
    validate_pretrain(cfg)
    with build_lock(path):
        if (path / "pretrain.json").exists():
            log.info(f"[pretrain] {path} was built by another process meanwhile: using it")
        else:
            log.info(f"[pretrain] no base model at {path}: pretraining it now (once)")
            _build(cfg, path)
    return path


register()


@hydra.main(config_path="conf", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("bgpo.pretrain"):
        validate_pretrain(cfg)
    pretrain(cfg)


if __name__ == "__main__":
    main()
