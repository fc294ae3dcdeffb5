"""Puts the repository's ``sweeps/`` presets on Hydra's search path: ``+sweeps=tiny_repro``."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class BGPOSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        root = Path(__file__).resolve().parents[2]
        if (root / "sweeps").is_dir():
            search_path.append(provider="bgpo-sweeps", path=f"file://{root}")
