"""The paper's settings that configs interpolate: n_t per method and task (``${paper_mc:...}``), the
equal-memory n_t (``${equal_memory_mc:...}``) and the full-scale lengths and steps of each task
(``${paper_task:...}``); ``bgpo.config.register`` installs them as OmegaConf resolvers."""

from __future__ import annotations

# docs/methods.md §5: n_t per method (and the task exceptions) in BGPO's comparison; the methods after BGPO
# take their own papers' values: SPG m = 2 MC samples (App. G.2), ESPO 2 (code: num_mc), coupled-GRPO
# λ = 1 pair (§5); TraceRL n_t = steps / s with the code's shrinkage s = 8; JustGRPO every position
# (n_t = gen_length: the exact AR log-likelihood)
PAPER_MC = {"bgpo": 16, "vrpo": 4, "diffugrpo": 1, "wd1": 1, "spg": 2, "espo": 2, "coupledgrpo": 1}
PAPER_MC_EXCEPTIONS = {("bgpo", "sudoku"): 32,
                       **{("vrpo", code): 2 for code in ("deepcoder", "humaneval", "mbpp")}}
# The equal-memory comparison (issue 14, BGPO Fig. 1's situation): every method gets the same
# peak-memory budget of the RL update — VRPO-OL's peak at n_t = 2 on the tiny runs' batch, measured
# by `python -m bgpo.bench memory` (results/bench/memory-cpu-tiny.jsonl) — and the largest n_t whose
# measured peak fits it; BGPO's peak does not grow with n_t, so it keeps the n_t it likes (16).
# tests/test_bench.py checks these against the committed benchmark rows.
EQUAL_MEMORY_MC = {"bgpo": 16, "vrpo": 2, "diffugrpo": 2, "wd1": 2}
TRACERL_SHRINK = 8


# docs/methods.md §5: training length / diffusion steps (block 32) and RL steps per task at full scale
# (math = MATH + GSM8K train, code = the DeepCoder subset; the single-test-set tasks keep them too)
_MATH = {"gen_length": 512, "diffusion_steps": 256, "steps": 700}
_CODE = {"gen_length": 512, "diffusion_steps": 512, "steps": 560}
PAPER_TASK = {"math": _MATH, "math500": _MATH, "gsm8k": _MATH,
              "deepcoder": _CODE, "humaneval": _CODE, "mbpp": _CODE,
              "sudoku": {"gen_length": 256, "diffusion_steps": 128, "steps": 400},
              "countdown": {"gen_length": 256, "diffusion_steps": 128, "steps": 560}}


def paper_mc(target: str, task: str, gen_length: int | None = None, steps: int | None = None) -> int:
    """``${paper_mc:${method._target_},${task.name}}``: the paper's n_t for a method and task. TraceRL
    and JustGRPO depend on the sampler: pass ``${task.gen_length},${task.diffusion_steps}`` (default:
    the task's full-scale settings, ``PAPER_TASK``)."""
    method = target.rsplit(".", 1)[-1].lower()
    if method == "tracerl":
        return max(1, (steps or paper_task(task, "diffusion_steps")) // TRACERL_SHRINK)
    if method == "justgrpo":
        return gen_length or paper_task(task, "gen_length")
    return PAPER_MC_EXCEPTIONS.get((method, task), PAPER_MC[method])


def equal_memory_mc(target: str) -> int:
    """``${equal_memory_mc:${method._target_}}``: a method's n_t within the equal-memory budget."""
    method = target.rsplit(".", 1)[-1].lower()
    if method not in EQUAL_MEMORY_MC:
        raise ValueError(f"method {method!r} has no equal-memory n_t; allowed: {sorted(EQUAL_MEMORY_MC)}")
    return EQUAL_MEMORY_MC[method]


def paper_task(task: str, key: str) -> int:
    """``${paper_task:${task.name},gen_length}``: the paper's full-scale setting of a task."""
    if task not in PAPER_TASK:
        raise ValueError(f"task.name={task!r}: the paper has no full-scale settings for it; "
                         f"allowed: {sorted(PAPER_TASK)}")
    return PAPER_TASK[task][key]
