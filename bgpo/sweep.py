"""Entry point of sweeps (parse and wire only): each Hydra job is one run in the results store.

    python -m bgpo.sweep -m method=bgpo,vrpo mc=4,16          # locally, one run after another
    python -m bgpo.sweep -m +sweeps=tiny_repro                # a preset from sweeps/
    python -m bgpo.sweep -m hydra/launcher=slurm ...          # Slurm through submitit

Re-running a sweep skips runs whose summary exists and resumes runs that have a checkpoint. A
bad setting in any job stops the sweep before it launches anything (exit code 2, one sentence); a
run that fails (non-finite values: ``failed.json``) does not stop the others, is listed at the end,
makes the sweep exit with code 1 and is retried only with ``retry_failed=true``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bgpo.config import ConfigError, register
from bgpo.results import RunFailed, read_failure, read_summary
from bgpo.train import run, test_line
from bgpo.validate import cli_errors

log = logging.getLogger("bgpo.sweep")  # not __name__, which is "__main__" under python -m


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job a multirun launches: a preset's ``hydra.sweeper.params``,
    then the command line's overrides (which win on the same key), expanded like Hydra's basic
    sweeper (``a=1,2 b=x,y``: four jobs)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.params or {}).items()]
    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task]):
        sweep = o.is_sweep_override()
        choices[o.get_key_element()] = list(o.sweep_string_iterator()) if sweep else [
            o.get_value_element_as_str()]
    return [[f"{k}={v}" for k, v in zip(choices, job, strict=True)]
            for job in itertools.product(*choices.values())]


class Validate(Callback):
    """Before a multirun launches anything: compose and validate EVERY job it will run, so a bad
    value inside a sweep list (``mc=2,0``) fails at start-up, naming the key, not when that job
    starts (possibly hours later, on Slurm)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        from bgpo.validate import validate_train

        # a local launcher runs the jobs on this machine: their device must exist here (a Slurm job's
        # is checked on its node, by bgpo.train.run, before a model is built)
        here = "slurm" not in str(config.hydra.launcher.get("_target_", "")).lower()
        jobs = sweep_jobs(config)
        try:
            job = []
            for job in jobs:  # every job's settings first: the first bad one is named
                validate_train(compose(config_name="sweep", overrides=job), here=here)
            plans = []
            for job in jobs:  # then what each will do (its run folder may name a problem too)
                plans.append((job, plan(compose(config_name="sweep", overrides=job), here)))
        except ConfigError as e:  # SystemExit: Hydra turns a callback's exceptions into warnings
            print(f"[bgpo.sweep] nothing launched; bad job {' '.join(job)}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        report_plan(plans)


def plan(cfg: DictConfig, here: bool = True) -> dict[str, Any]:
    """One job's plan, nothing built: its run folder and state, its base model (shipped, cached, or
    pretrained first), and its time estimated from the committed runs' measured wall time."""
    from bgpo.provision import base_model_path
    from bgpo.train import measured_minutes, resolved_config, run_state

    resolved = resolved_config(cfg, here)
    path, state, _ = run_state(resolved)
    base = base_model_path(cfg.task.name, cfg.model)
    base_note = ("" if cfg.model.kind != "tiny" or base is None or (base / "config.json").exists()
                 else "pretrains its base model first")
    est = measured_minutes(resolved) if state in ("new", "resumes") else None
    return {"run_dir": path, "state": state, "base": base_note, "minutes": est}


def report_plan(plans: list[tuple[list[str], dict[str, Any]]]) -> None:
    """Before anything launches: each job's folder, state, base model and estimated time."""
    todo = [p for _, p in plans if p["state"] in ("new", "resumes")]
    known = [p["minutes"][0] for p in todo if p["minutes"]]
    log.info(f"[bgpo.sweep] plan: {len(plans)} jobs, {len(todo)} to train, "
             f"{sum(p['state'] == 'complete' for _, p in plans)} complete (skipped), "
             f"{sum(p['state'] == 'failed' for _, p in plans)} failed (retry_failed=true retries)")
    for overrides, p in plans:
        est = (f", ~{p['minutes'][0]:.0f} min of one thread (median of {p['minutes'][1]} committed runs)"
               if p["minutes"] else ", time unknown (no committed run of this method, task and model)"
               if p["state"] in ("new", "resumes") else "")
        base = f", {p['base']}" if p["base"] else ""
        log.info(f"  {' '.join(o for o in overrides if not o.startswith('+sweeps='))}: {p['run_dir']} "
                 f"({p['state']}{base}{est})")
    if known:
        log.info(f"[bgpo.sweep] estimated: {sum(known):.0f} min of one thread for the {len(known)} jobs "
                 f"with committed runs to go by")


class Report(Callback):
    """After a multirun: where the results are, which runs are complete and which failed (then the
    sweep exits with code 1)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.results_dir)
        runs = sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith("."))
        done = {p.name: s for p in runs if (s := read_summary(p, write=False)) is not None}
        failed = {p.name: f for p in runs if p.name not in done and (f := read_failure(p)) is not None}
        log.info(f"[bgpo.sweep] results in {root.resolve()}: {len(done)} complete runs")
        for name, s in done.items():
            log.info(f"  {name}: test accuracy {test_line(s)}")
        if failed:
            log.error(f"[bgpo.sweep] {len(failed)} failed runs (not retried without retry_failed=true):")
            for name, f in failed.items():
                log.error(f"  {name}: step {f.get('step')}: {f.get('reason')}")
            raise SystemExit(1)


register()


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    with cli_errors("bgpo.sweep"):
        try:
            return run(cfg)
        except RunFailed as e:  # the other jobs go on; Report lists it and the sweep exits 1
            log.error(f"[bgpo.sweep] {e}")
            return {"failed": str(e)}


if __name__ == "__main__":
    main()
