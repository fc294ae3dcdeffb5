"""Tasks of the suite (docs/methods.md §6). Importing this package registers every task by name."""

from bgpo.tasks import (  # noqa: F401  (registration)
    countdown,
    deepcoder,
    gsm8k,
    humaneval,
    math500,
    math_mix,
    mbpp,
    sudoku,
)
from bgpo.tasks.base import (
    FORMATS,
    Example,
    Format,
    Score,
    Task,
    get_task,
    prompt_text,
    register_task,
    task_names,
    task_rewards,
    task_scores,
)
from bgpo.tasks.data import check_task_data, d1_data_dir

__all__ = ["FORMATS", "Example", "Format", "Score", "Task", "check_task_data", "d1_data_dir", "get_task",
           "prompt_text", "register_task", "task_names", "task_rewards", "task_scores"]


def _import_user_tasks() -> None:
    """``BGPO_TASK_MODULES=pkg.mod1,pkg.mod2`` registers tasks from outside the suite (the
    variable reaches Slurm jobs too, since sbatch exports the environment)."""
    import importlib
    import os

    for mod in filter(None, os.environ.get("BGPO_TASK_MODULES", "").split(",")):
        importlib.import_module(mod.strip())


_import_user_tasks()
