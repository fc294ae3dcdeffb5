"""Entry point of sweeps (parse and wire only): each Hydra job is one run in the results store.

    python -m bgpo.sweep -m method=bgpo,vrpo mc=4,16          # locally, one run after another
    python -m bgpo.sweep -m +sweeps=tiny_repro                # a preset from sweeps/
    python -m bgpo.sweep -m hydra/launcher=slurm ...          # Slurm through submitit

Re-running a sweep skips runs whose summary exists and resumes runs that have a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bgpo.config import register
from bgpo.train import run


class Report(Callback):
    """After a multirun: where the results are, and which runs trained now vs were complete."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.results_dir)
        done = sorted(p.parent.name for p in root.glob("*/summary.json"))
        print(f"[bgpo.sweep] results in {root.resolve()}: {len(done)} complete runs")
        for name in done:
            s = json.loads((root / name / "summary.json").read_text())
            print(f"  {name}: eval accuracy {s['final'].get('eval/accuracy')}")


register()


@hydra.main(config_path="conf", config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    main()
