"""Run every bad-setting probe of the validation tests and write their outcomes to
docs/bad_settings.md (the table the README cites):

    python -m tests.bad_settings            # ~2 minutes on one core; no model is built

Each settings probe goes through the same path as its test (``bgpo.train.run``,
``validate_pretrain``, ``validate_evaluate``, the sweep's pre-launch check) with every way of building
a model patched to raise; each file probe (a corrupt or cut checkpoint, a garbage config or
``--reported`` file, an output folder the suite did not make) runs the real command line. The outcome is the
sentence the user reads, or Hydra's own message for a key or value its schema rejects; a probe
that is accepted or ends in a traceback is listed as such (the test of the document then fails).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_settings.md"


@contextlib.contextmanager
def no_model() -> Iterator[None]:
    import bgpo.model
    import bgpo.pretrain
    import bgpo.trainer

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the bad setting was rejected")

    names = ((bgpo.model, "load_dllm"), (bgpo.model, "build_tiny"), (bgpo.trainer, "load_dllm"),
             (bgpo.trainer, "load_policy"), (bgpo.trainer, "train"), (bgpo.pretrain, "build_tiny"),
             (bgpo.pretrain, "ensure_base_model"), (bgpo.pretrain, "_build"))
    with contextlib.ExitStack() as stack:
        for mod, name in names:
            stack.enter_context(mock.patch.object(mod, name, built))
        yield


def outcome(check: Callable[[], object]) -> tuple[str, str]:
    """(kind, message): ``rejected`` (exit 2, one sentence), ``hydra`` (the schema's message, no
    traceback at the CLI), ``accepted`` or ``traceback`` (both failures of the suite)."""
    from hydra.errors import ConfigCompositionException

    from bgpo.config import ConfigError

    err = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            result = check()
    except ConfigError as e:
        return "rejected", " ".join(str(e).split())
    except SystemExit as e:  # an entry point's own exit: code 2 and one sentence on stderr
        text = " ".join(err.getvalue().split())
        return ("rejected" if e.code == 2 and "Traceback" not in text else "traceback"), text
    except ConfigCompositionException as e:
        return "hydra", " ".join(str(e.__cause__ or e).split()).split(" full_key:")[0]
    except Exception as e:  # noqa: BLE001 - what the probe is for
        return "traceback", f"{type(e).__name__}: {e}"
    if isinstance(result, Cli):
        return result.outcome()
    return "accepted", ""


class Cli:
    """A probe through the real command line: exit code 2 with one sentence and no traceback is
    ``rejected``; exit code 0 is ``accepted``; anything else a ``traceback``."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                                   cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)

    def outcome(self) -> tuple[str, str]:
        err = " ".join(self.proc.stderr.split())
        if self.proc.returncode == 2 and "Traceback" not in err:
            return "rejected", err
        return ("accepted", err) if self.proc.returncode == 0 else ("traceback", err[-300:])


def files(tmp: Path) -> list[tuple[str, str, Callable[[], object]]]:
    """Files the entry points read or replace, each broken one way (``{f}`` is their folder)."""
    import torch

    f = tmp / "files"
    f.mkdir()
    (f / "garbage.pt").write_bytes(b"\x00not a pickle" * 50)
    torch.save({"model": {"w": torch.zeros(1000)}, "step": 3}, f / "whole.pt")
    (f / "cut.pt").write_bytes((f / "whole.pt").read_bytes()[:700])
    (f / "run").mkdir()
    (f / "run" / "config.yaml").write_text("method: [unclosed\n  - : :\n")
    from omegaconf import OmegaConf

    from tests.test_validation import compose_train

    for name, pt in (("run_garbage_pt", f / "garbage.pt"), ("run_cut_pt", f / "cut.pt")):
        (f / name / "checkpoints").mkdir(parents=True)
        OmegaConf.save(compose_train(f"run_dir={f / name}"), f / name / "config.yaml")  # a Countdown run
        for which in ("last", "best"):
            (f / name / "checkpoints" / f"{which}.pt").write_bytes(pt.read_bytes())
    for theirs in ("theirs", "theirs_tables/tables"):
        (f / theirs).mkdir(parents=True)
        (f / theirs / "thesis.tex").write_text("a user's file that no command may delete\n")
    (f / "reported.yaml").write_text("table1: [1, 2\n  bad: {\n")
    (f / "a_file").write_text("not a folder\n")
    rows = [("bgpo.evaluate", "checkpoint={f}/garbage.pt"), ("bgpo.evaluate", "checkpoint={f}/cut.pt"),
            ("bgpo.evaluate", "checkpoint={f}/run"),
            ("bgpo.evaluate", "checkpoint={f}/run_garbage_pt/checkpoints/best.pt"),
            ("bgpo.evaluate", "checkpoint={f}/run_cut_pt/checkpoints/best.pt task=sudoku"),
            ("bgpo.evaluate", "checkpoint={f}/run_garbage_pt/checkpoints/best.pt out={f}/a_file"),
            ("bgpo.export", "run_dir={f}/run out={tmp}/export1"),
            ("bgpo.export", "run_dir={f}/run_garbage_pt which=last out={tmp}/export2"),
            ("bgpo.export", "run_dir={f}/run_cut_pt which=best out={tmp}/export3"),
            ("bgpo.export", "run_dir={f}/run_cut_pt which=final out={tmp}/export4"),
            ("bgpo.export", "run_dir={f}/run_garbage_pt which=last out={f}/theirs"),
            ("bgpo.export", "run_dir={f}/run_garbage_pt which=last out={f}/a_file"),
            ("bgpo.paper", "--reported {f}/reported.yaml --out {tmp}/paper1"),
            ("bgpo.paper", "--out {f}/a_file"), ("bgpo.paper", "--out {f}/a_file/paper"),
            ("bgpo.paper", "--out {f}/theirs_tables"),
            ("bgpo.paper", "--results {f}/a_file --out {tmp}/paper2")]
    return [(entry, args, lambda e=entry, a=args: Cli(e, *a.format(f=f, tmp=tmp).split()))
            for entry, args in rows]


def probes(tmp: Path) -> list[tuple[str, str, Callable[[], object]]]:
    """(entry point, command line, the check) of every probe in the validation tests' tables."""
    from bgpo.evaluate import validate_evaluate
    from bgpo.train import run
    from tests import test_validation as tv

    data = tv.make_data(tmp / "data")
    rows: list[tuple[str, str, Callable[[], object]]] = []
    for i, (overrides, _) in enumerate(tv.BAD):
        args = [o.format(d=data) for o in overrides]
        rows.append(("bgpo.train", " ".join(overrides), lambda a=args, i=i: run(
            tv.compose_train(f"results_dir={tmp / 'runs' / str(i)}", *a))))
    for override, _ in tv.PRETRAIN_BAD:
        from bgpo.validate import validate_pretrain

        rows.append(("bgpo.pretrain", override,
                     lambda o=override: validate_pretrain(tv.compose_train(o, config="pretrain"))))
    for override, _ in tv.EVALUATE_BAD:
        arg = override.format(d=data)
        rows.append(("bgpo.evaluate", f"checkpoint={{d}} {override}", lambda a=arg: validate_evaluate(
            tv.compose_train(f"checkpoint={data}", a, config="evaluate"))))
    for overrides, _ in tv.SWEEP_BAD:
        rows.append(("bgpo.sweep", f"-m {overrides}",
                     lambda o=overrides: tv.validate_sweep(o.format(d=data))))
    return rows + files(tmp)


def main() -> int:
    import tests.toy_task  # noqa: F401  (the toy task some probes name)
    from bgpo.config import register

    register()
    table = []
    with tempfile.TemporaryDirectory() as t, no_model():
        tmp = Path(t)
        (tmp / "data").mkdir()
        for entry, command, check in probes(tmp):
            kind, message = outcome(check)
            message = (message.replace(str(tmp / "data"), "{d}").replace(str(tmp / "files"), "{f}")
                       .replace(str(tmp), "{tmp}")
                       .replace(str(ROOT), "<repository>"))
            table.append((entry, command, kind, re.sub(r"\s+", " ", message).replace("|", "\\|")))
    counts = {k: sum(r[2] == k for r in table) for k in ("rejected", "hydra", "accepted", "traceback")}
    lines = ["# Bad settings and what the suite answers", "",
             "Generated by `python -m tests.bad_settings` from the probe tables of "
             "`tests/test_validation.py` (each probe is also a test; `{d}` is a folder of data files with "
             "one bad row each) and of files broken one way each (`{f}`: a garbage and a cut checkpoint, "
             "a run folder with a garbage `config.yaml`, a garbage `--reported` file, a folder of the "
             "user's own that no command may replace). Every settings probe is rejected before any model "
             "is built: `rejected` is the suite's one sentence (exit code 2 at the command line, the same "
             "with `validate_only=true`), `hydra` is the schema's own message for an unknown key or a "
             "value of the wrong type.", "",
             f"{len(table)} probes: {counts['rejected']} rejected by the suite, {counts['hydra']} by Hydra's "
             f"schema, {counts['accepted']} accepted, {counts['traceback']} tracebacks.", "",
             "| # | entry point | settings | outcome | message |", "|---|---|---|---|---|"]
    for i, (entry, command, kind, message) in enumerate(table, 1):
        lines.append(f"| {i} | {entry} | `{command}` | {kind} | {message} |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    print(f"{DOC}: {len(table)} probes, {counts}")
    return 0 if counts["accepted"] == counts["traceback"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
