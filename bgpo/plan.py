"""A memory plan of one RL update at any model shape, computed on CPU with fake tensors (issue 25.2).

    python -m bgpo.plan --model llada-8b --methods bgpo,vrpo --mc 1,2,4,8,16 --world 8 --gpu 80,141
    python -m bgpo.plan --model tiny --validate results/bench/memory-cpu-tiny.jsonl   # the check

What runs is the suite's own code — the model class built under ``FakeTensorMode`` at the shape
(tensors with shapes and dtypes, no data), the shared ELBO sampler's draws, the method's
``prepare`` and its per-chunk backward (``bgpo.method.backward``), ``clip_grad_norm_`` and AdamW's
step, as ``bgpo.bench memory``'s update does it — while two meters count bytes:

- ``saved_bytes``: the peak of the storages autograd keeps for backward (the same meter as the
  memory benchmark's CPU rows, ``SavedTensorMeter``): ``--validate`` compares it with the measured
  rows of the same method and n_t (within 10%);
- ``update_peak_bytes``: the peak of every storage the update allocates (activations, their
  temporaries, the gradients, the optimizer's update buffers), counted from their allocation to
  the freeing of the tensor that made them.

Per rank: ``static_bytes`` (parameters + AdamW state, after a warm-up update) + ``update_peak_bytes``
is the planned peak of one process. ``--world W`` MODELS (does not run) FSDP over W ranks:
parameters, gradients and optimizer state divided by W, plus one transformer block gathered
whole in the compute dtype; activations stay per rank (each rank updates its own prompts). Rows
name the GPU sizes they fit (``--gpu``, GB of 10^9 bytes). Not yet planned: rollout, evaluation
and checkpoint save (rank 0's full gather), and bf16 autocast's per-forward weight copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bgpo.bench._common import BatchSpec, method_partial, needs_ref, std_adv, synthetic_batch
from bgpo.bench.memory import SavedTensorMeter
from bgpo.method import backward as method_backward
from bgpo.model import DLLM, build_char_tokenizer
from bgpo.update import advantages

GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Bytes of the new storages the operators inside allocate, live at once: a storage counts
    from its allocation until the last tensor viewing it is freed (views and in-place results
    bring no new bytes). Works on fake and meta tensors, where nothing is allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.views: dict[int, list[int]] = {}  # storage -> [tensors viewing it, bytes]

    def _drop(self, key: int) -> None:
        entry = self.views[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.views[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or any(t is x for x in inputs):
                continue  # an in-place result: the input tensor itself
            key = t.untyped_storage()._cdata
            if key in self.views:
                self.views[key][0] += 1  # a new view of a tracked storage
            elif any(x.untyped_storage()._cdata == key for x in inputs):
                continue  # a view of a storage made before the meter started
            else:
                self.views[key] = [1, t.untyped_storage().nbytes()]
                self.live += self.views[key][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, key)
        return out


MODELS = ("tiny", "llada-8b", "dream-7b")


def fakeify(net: torch.nn.Module, mode: Any) -> None:
    """Replace every parameter and buffer of a (small, real) network by a fake one of the same
    shape, dtype and ``requires_grad``."""
    for mod in net.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = mode.from_tensor(b)


def build(model: str, dtype: torch.dtype, mode: Any, layers: int | None = None) -> DLLM:
    """The model of ``model`` with fake weights: the tiny dLLM's default architecture (built for
    real, a few MB, then made fake), or the native LLaDA-8B / Dream-7B class at its published shape,
    built inside ``mode`` (nothing allocated)."""
    if model == "tiny":
        from bgpo.config import ModelConfig
        from bgpo.model import build_tiny

        m = ModelConfig()
        policy = build_tiny(seed=0, hidden=m.hidden, layers=m.layers, heads=m.heads,
                            intermediate=m.intermediate)
        policy.net.to(dtype)
        fakeify(policy.net, mode)
        return policy
    from bgpo.models import NATIVE

    kind = model.split("-")[0]
    cls = NATIVE[kind]
    depth = {"n_layers" if kind == "llada" else "num_hidden_layers": layers} if layers else {}
    config = cls.config_class(**depth)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mode:
            net = cls(config)
    finally:
        torch.set_default_dtype(old)
    return DLLM.wrap(net, build_char_tokenizer(), kind=kind, mask_token_id=config.mask_token_id)


def plan_update(model: str, method: str, n_t: int, spec: BatchSpec, precision: str = "fp32",
                world: int = 1, layers: int | None = None, optimizer: str = "adamw") -> dict[str, Any]:
    """The planned bytes of one RL update of ``method`` at ``n_t`` under ``model.precision``
    ``precision`` (one process; FSDP over ``world`` ranks modelled as the module docstring says)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bgpo.model import apply_precision

    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    policy = apply_precision(build(model, dtype, mode, layers), precision)  # bf16-mixed: autocast
    ref = build(model, dtype, mode, layers) if needs_ref(method_partial(method, n_t)) else None
    with mode:
        params = [p for p in policy.net.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-6)  # no state (the GPU check's choice)
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
        partial = method_partial(method, n_t)
        impl = partial(ref=ref)
        batch, rewards = synthetic_batch(policy, spec)
        adv = advantages(rewards, spec.group, std_adv(partial)).to(torch.float32)

        def update(seed: int) -> None:  # as bgpo.bench.memory.Rig.update: one on-policy RL update
            opt.zero_grad(set_to_none=True)
            prep = impl.prepare(policy, batch, 1, torch.Generator().manual_seed(seed))
            method_backward(impl, policy, batch, adv, prep, 0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        update(0)  # warm-up: AdamW's state exists from here on, as in training
        opt.zero_grad(set_to_none=True)
        static = sum(t.untyped_storage().nbytes() for t in [*policy.net.parameters(), *policy.net.buffers()])
        static += sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
        if ref is not None:
            static += sum(p.untyped_storage().nbytes() for p in ref.net.parameters())
        resident = [*policy.net.parameters(), *policy.net.buffers()]
        with LiveBytes() as live, SavedTensorMeter(exclude=resident) as saved:
            update(1)
        grads = sum(p.numel() * p.element_size() for p in params)
        blocks = [m for m in policy.net.modules() if type(m).__name__.endswith(("Block", "DecoderLayer"))]
        unit = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
    # FSDP: the autocast copies of every weight (bf16-mixed) become one gathered block in bfloat16
    copies = sum(p.numel() for p in params) * 2 if precision == "bf16-mixed" else 0
    gathered = unit // (2 if precision == "bf16-mixed" else 1)
    per_rank = static / world + (live.peak - grads) + grads / world if world == 1 else (
        static / world + (live.peak - grads - copies) + grads / world + gathered)
    return {"model": model, "layers": layers, "optimizer": optimizer, "method": method, "mc": n_t,
            "precision": precision,
            "world": world, "batch_sequences": spec.prompts * spec.group, "prompt_length": spec.prompt_length,
            "gen_length": spec.gen_length, "params": sum(p.numel() for p in params), "static_bytes": static,
            "update_peak_bytes": live.peak, "saved_bytes": saved.peak, "grad_bytes": grads,
            "fsdp_unit_bytes": unit, "per_rank_peak_bytes": int(per_rank)}


def validate(rows: list[dict[str, Any]], measured: list[dict[str, Any]], tol: float = 0.10) -> list[str]:
    """Planned ``saved_bytes`` against the memory benchmark's measured CPU rows (``peak_bytes``:
    the same meter on real tensors) of the same method and n_t: the mismatches beyond ``tol``."""
    got = {(r["method"], r["mc"]): r["saved_bytes"] for r in rows}
    bad = []
    for m in measured:
        key = (str(m["method"]), int(m["mc"]))
        if key in got and m.get("peak_bytes"):
            rel = abs(got[key] - m["peak_bytes"]) / m["peak_bytes"]
            if rel > tol:
                bad.append(f"{key}: planned {got[key]} vs measured {m['peak_bytes']} ({rel:.1%})")
    return bad


PAPER_METHODS = {"bgpo": "BGPO", "vrpo": "VRPO", "diffu_grpo": "DiffuGRPO", "wd1": "WD1"}
PAPER_TASKS = ("math", "deepcoder", "sudoku", "countdown")
PAPER_WORLD, PAPER_PROMPTS, PAPER_GROUP = 8, 16, 8  # sweeps/paper_main.yaml: 8 GPUs, 16 prompts × G 8


def jobs(a: argparse.Namespace) -> list[tuple[str | None, str, int, BatchSpec]]:
    """(task, method, n_t, batch of one rank) of each planned point."""
    if not a.paper:
        spec = BatchSpec(prompts=a.prompts, group=a.group, prompt_length=a.prompt_length,
                         gen_length=a.gen_length)
        return [(None, m, int(n), spec) for m in a.methods.split(",") for n in a.mc.split(",")]
    from bgpo.paper_settings import paper_mc, paper_task

    return [(task, m, paper_mc(cls, task), BatchSpec(prompts=PAPER_PROMPTS // PAPER_WORLD, group=PAPER_GROUP,
                                                     prompt_length=a.prompt_length,
                                                     gen_length=paper_task(task, "gen_length")))
            for task in PAPER_TASKS for m, cls in PAPER_METHODS.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bgpo.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=MODELS)
    p.add_argument("--methods", default="bgpo,vrpo")
    p.add_argument("--mc", default="1,2,4,8,16,32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=16, help="(--paper: 256 unless given)")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "bf16-pure"])
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--layers", type=int, help="fewer transformer blocks at the model's width (native models)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--gpu", default="80,141", help="GPU sizes in GB to give a verdict for")
    p.add_argument("--paper", action="store_true",
                   help="every job of sweeps/paper_main.yaml: LLaDA-8B, bf16-mixed, 8 ranks, 16 prompts x 8 "
                        "a step (2 a rank), the paper's n_t and lengths (prompt length: --prompt-length)")
    p.add_argument("--validate", help="a memory benchmark .jsonl to check the planned saved bytes against")
    p.add_argument("--out", help="write the rows here (.jsonl)")
    a = p.parse_args(argv)
    for key in ("world", "prompts", "group", "prompt_length", "gen_length", "layers"):
        if getattr(a, key) is not None and getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(a, key)} must be >= 1")
    if any(int(x) < 1 for x in a.mc.split(",")):
        p.error(f"--mc={a.mc}: every n_t must be >= 1")
    if a.paper and "--prompt-length" not in (sys.argv if argv is None else argv):
        a.prompt_length = 256  # an assumed prompt length for the paper's tasks (chat template + problem)
    gpus = [float(g) for g in a.gpu.split(",") if g]
    rows = []
    for task, method, n_t, spec in jobs(a):
        row = plan_update("llada-8b" if a.paper else a.model, method, n_t, spec,
                          "bf16-mixed" if a.paper else a.precision, PAPER_WORLD if a.paper else a.world,
                          None if a.paper else a.layers, "adamw" if a.paper else a.optimizer)
        row.update({"task": task} if task else {})
        row["fits"] = {f"{g:g}GB": row["per_rank_peak_bytes"] <= g * GB for g in gpus}
        row["cmd"] = "python -m bgpo.plan " + " ".join(sys.argv[1:] if argv is None else argv)
        rows.append(row)
        print(f"{task or '':10s} {method:10s} n_t={n_t:3d} "
              f"per-rank {row['per_rank_peak_bytes'] / GB:6.2f} GB "
              f"(static {row['static_bytes'] / GB:.2f}, update {row['update_peak_bytes'] / GB:.2f}, "
              f"saved {row['saved_bytes'] / GB:.3f}) fits {row['fits']}", flush=True)
    if a.out:
        from bgpo.results import atomic_write_text

        atomic_write_text(a.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if a.validate:
        measured = [json.loads(line) for line in Path(a.validate).read_text().splitlines() if line.strip()]
        bad = validate(rows, measured)
        print(f"[bgpo.plan] saved bytes vs {a.validate}: " + ("within 10% for every row" if not bad else
                                                              "; ".join(bad)))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
