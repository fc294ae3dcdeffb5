"""Puts the ``sweeps/`` presets on Hydra's search path: ``+sweeps=tiny_repro``, from a checkout and
from an installed wheel alike (``bgpo/presets/sweeps`` links to the repository's ``sweeps/``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class BGPOSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # bgpo/presets holds one folder, sweeps/ (the repository's sweeps/, shipped in the wheel),
        # so the search path adds the group `sweeps` and nothing else (not the repository's folders)
        presets = files("bgpo") / "presets"
        if (Path(str(presets)) / "sweeps").is_dir():
            search_path.append(provider="bgpo-sweeps", path=f"file://{presets}")
