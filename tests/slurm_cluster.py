"""A real one-node Slurm cluster (with accounting) for the test suite.

The session-scoped fixture ``slurm_cluster`` starts munged, MariaDB, slurmdbd, slurmctld and slurmd
under a temporary directory with ``scripts/slurm/start`` and always stops them with
``scripts/slurm/stop``. It skips when the Slurm binaries are missing and cannot be installed; the
install (``scripts/slurm/install``, root + apt) is only attempted when ``BGPO_SLURM_INSTALL=1``.

Environment variables:
    BGPO_SLURM_INSTALL=1   install the Debian packages when they are missing (CI sets it)
    BGPO_SLURM_KEEP=1      keep the cluster directory (configs, logs) after the session
    BGPO_SLURM_*_PORT      ports, see scripts/slurm/start
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts" / "slurm"
REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "squeue",
    "scancel",
    "sacct",
    "sacctmgr",
    "sinfo",
    "munged",
    "mariadbd",
    "mariadb-install-db",
)
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running cluster."""

    dir: Path  # everything lives here: slurm.conf, logs (log/), state, pid files (run/)
    env: dict[str, str]  # os.environ plus SLURM_CONF, for subprocesses
    partition: str

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def logs(self, tail: int = 40) -> str:
        """Last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"----- {log}\n" + "\n".join(lines))
        return "\n".join(parts)


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-root PATH may lack
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return shutil.which(name, path=path)


def _missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if _which(b) is None]


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _ensure_installed() -> None:
    """Skip (with the reason) unless the Slurm binaries are present or could be installed."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.environ.get("BGPO_SLURM_INSTALL") != "1":
        pytest.skip(
            f"Slurm binaries missing ({', '.join(missing)}); run scripts/slurm/install as root "
            "or set BGPO_SLURM_INSTALL=1 to let the test suite install them"
        )
    if os.geteuid() != 0:
        pytest.skip(f"Slurm binaries missing ({', '.join(missing)}) and not root: cannot install them")
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm binaries missing ({', '.join(missing)}) and apt-get is unavailable")
    proc = subprocess.run(
        [str(SCRIPTS / "install")], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0 or _missing_binaries():
        pytest.skip(
            f"scripts/slurm/install failed (rc={proc.returncode}); Slurm unavailable:\n"
            + _tail(proc.stdout + proc.stderr)
        )


def _stop(cluster_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / "stop"), str(cluster_dir)],
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster (partition ``debug``, fake GPUs, accounting)."""
    _ensure_installed()
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root; not running as root")

    # a short path: munge and MariaDB use Unix sockets under it (108-byte limit)
    cluster_dir = Path(tempfile.mkdtemp(prefix="bgpo-slurm-"))
    saved_conf = os.environ.get("SLURM_CONF")
    started = False
    try:
        try:
            proc = subprocess.run(
                [str(SCRIPTS / "start"), str(cluster_dir)],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"scripts/slurm/start timed out after {START_TIMEOUT_S}s:\n{e.stderr or ''}")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("export SLURM_CONF="):
            pytest.fail(
                f"scripts/slurm/start {cluster_dir} failed (rc={proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        started = True
        conf = lines[-1].split("=", 1)[1]
        os.environ["SLURM_CONF"] = conf
        env = dict(os.environ)
        yield SlurmCluster(
            dir=cluster_dir, env=env, partition=os.environ.get("BGPO_SLURM_PARTITION", "debug")
        )
    finally:
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf
        stop = _stop(cluster_dir)
        if stop.returncode == 0 and os.environ.get("BGPO_SLURM_KEEP") != "1":
            shutil.rmtree(cluster_dir, ignore_errors=True)
        if started and stop.returncode != 0:
            pytest.fail(f"scripts/slurm/stop failed (rc={stop.returncode}):\n{stop.stdout}\n{stop.stderr}")
