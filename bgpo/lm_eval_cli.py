"""lm-eval's command line with the suite's model and tasks available (issue 6):

    python -m bgpo.lm_eval_cli --model bgpo_dllm --model_args pretrained=PATH,mc_num=64 \\
        --tasks bgpo_countdown,bgpo_sudoku --limit 16

lm-eval 0.4.13 discovers models only through its own registry (no entry points), so this module
imports ``bgpo.lm_eval_model`` (which registers ``bgpo_dllm``) and then hands the arguments to
``lm_eval.__main__.cli_evaluate`` unchanged, except that the suite's task folder
(``bgpo/lm_tasks``) is added as ``--include_path`` when none is given. Built-in tasks stay
available (``--tasks gsm8k,bgpo_countdown``).
"""

from __future__ import annotations

import sys

from bgpo.lm_eval_tasks import TASKS_DIR

# lm-eval subcommands that take --include_path (a bare argument list means "run")
_WITH_INCLUDE = ("run", "ls", "validate")


def with_suite_tasks(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path <bgpo/lm_tasks>`` unless it already names one."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    if argv[0].startswith("-") or argv[0] in _WITH_INCLUDE:
        return [*argv, "--include_path", str(TASKS_DIR)]
    return argv


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import bgpo.lm_eval_model  # noqa: F401  (registers bgpo_dllm)

    args = with_suite_tasks(list(sys.argv[1:] if argv is None else argv))
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
