"""A memory plan of a run at any model shape and world size, computed on CPU with fake tensors (issue 25.2).

    python -m bgpo.plan --model llada-8b --methods bgpo,vrpo --mc 1,2,4,8,16 --world 8 --gpu 80,141
    python -m bgpo.plan --model tiny --validate results/bench/memory-cpu-tiny.jsonl   # the check
    python -m bgpo.plan --paper --out results/bench/plan-paper-main.jsonl           # every paper job

What runs is the suite's own code on rank 0 of ``--world`` — the model class built under
``FakeTensorMode`` at the shape (tensors with shapes and dtypes, no data), sharded by the
trainer's FSDP2 (``Dist.shard``) over torch's fake process group (collectives answered in-process
with outputs of the right shape), then each phase of a run under byte meters:

- ``build``: the rank's weights (FSDP: its shards, read from the checkpoint slice by slice);
- ``rollout``: the reference sampler decoding the rank's sequences, inside ``full_params`` (every
  block gathered whole, as the trainer decodes), one step per block;
- ``update``: one RL update — the shared ELBO sampler's draws, the method's ``prepare`` and
  per-chunk backward (``bgpo.method.backward``), ``clip_grad_norm_`` and AdamW's step, as
  ``bgpo.bench memory``'s update does it, after a warm-up update that creates AdamW's state;
- ``evaluation``: the sampler on a batch of ``EVAL_BATCH`` problems, inside ``full_params``;
- ``checkpoint``: sharded (DCP): no bytes beyond the resident ones on the GPU; the host stages one
  tensor at a time (``host_bytes``, beside what the former full gather to rank 0 held);
- ``finish``: the end-of-run fingerprint, one float64 chunk at a time.

Two meters count bytes: ``saved_bytes``, the peak of the storages autograd keeps for backward
(the memory benchmark's CPU meter, ``SavedTensorMeter``: ``--validate`` compares it with the
measured rows of the same method and n_t, within 10%), and ``LiveBytes``, every storage the phase
allocates, counted from its allocation to the freeing of the tensor that made it. A phase's peak
is the rank's resident bytes (weights, AdamW state, a frozen reference) plus its own; rows name the
GPU sizes the rank's peak over all phases fits (``--gpu``, GB of 10^9 bytes). With ``--paper``
the Slurm preset's ``mem_gb``, ``signal_delay_s`` and ``ckpt_every`` are sized from the rows
(``slurm_sizing``; its throughput and bandwidth are stated assumptions, not measurements). Not
counted: the CUDA context, the caching allocator's fragmentation and NCCL's buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bgpo.bench._common import BatchSpec, method_partial, needs_ref, std_adv, synthetic_batch
from bgpo.bench.memory import SavedTensorMeter
from bgpo.method import backward as method_backward
from bgpo.model import DLLM, build_char_tokenizer
from bgpo.parallel import Dist, local_fingerprint
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


@contextlib.contextmanager
def fake_ranks(world: int) -> Iterator[Dist]:
    """Rank 0 of ``world`` (FSDP) over torch's fake process group: every collective returns at
    once with outputs of the right shape, so FSDP2 shards, all-gathers and reduce-scatters as on
    ``world`` GPUs, in one process. ``world`` 1: one process, no group."""
    if world == 1:
        yield Dist()
        return
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if tdist.is_initialized():
        raise RuntimeError("bgpo.plan: a process group is already running in this process")
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield Dist(rank=0, world=world, strategy="fsdp")
    finally:
        tdist.destroy_process_group()


def plan_update(model: str, method: str, n_t: int, spec: BatchSpec, precision: str = "fp32",
                world: int = 1, layers: int | None = None, optimizer: str = "adamw",
                checkpointing: bool = False) -> dict[str, Any]:
    """The planned bytes of rank 0 of ``world`` through one run of ``method`` at ``n_t`` under
    ``model.precision`` ``precision``: the trainer's own build (FSDP2 over a fake process group
    when ``world`` > 1), one RL update, a rollout and an evaluation batch inside ``full_params``,
    the checkpoint and the fingerprint."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bgpo.model import apply_precision, enable_activation_checkpointing

    dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    compute = torch.bfloat16 if precision == "bf16-mixed" else None
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_ranks(world) as dist:
        policy = apply_precision(build(model, dtype, mode, layers), precision, sharded=dist.fsdp)
        if checkpointing:  # model.activation_checkpointing: each block recomputed in the backward pass
            enable_activation_checkpointing(policy.net)
            policy.net.train()
        ref = build(model, compute or dtype, mode, layers) if needs_ref(method_partial(method, n_t)) else None
        if ref is not None:  # bf16-mixed: the frozen reference keeps no float32 copy (as the trainer)
            ref.autocast_dtype = policy.autocast_dtype
            dist.shard(ref.net.requires_grad_(False), compute, frozen=True)
        dist.shard(policy.net, compute)
        with mode:
            row = _run_phases(policy, ref, dist, method, n_t, spec, optimizer)
    return {"model": model, "layers": layers, "optimizer": optimizer, "method": method, "mc": n_t,
            "activation_checkpointing": checkpointing, "block_length": spec.block_length,
            "precision": precision, "world": world, "batch_sequences": spec.prompts * spec.group,
            "prompt_length": spec.prompt_length, "gen_length": spec.gen_length, **row,
            "eval_batch": EVAL_BATCH}


def _run_phases(policy: DLLM, ref: DLLM | None, dist: Dist, method: str, n_t: int, spec: BatchSpec,
                optimizer: str) -> dict[str, Any]:
    """Inside the fake mode: each phase run once under the byte meters (``plan_update``)."""
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
    weights = local_bytes([*policy.net.parameters(), *policy.net.buffers()])
    static = weights + local_bytes([v for st in opt.state.values() for v in st.values()])
    static += local_bytes(list(ref.net.parameters())) if ref is not None else 0
    resident = [*policy.net.parameters(), *policy.net.buffers()]
    with LiveBytes() as live, SavedTensorMeter(exclude=resident) as saved:
        update(1)
    rollout_live = decode_bytes(policy, spec.prompts * spec.group, spec, 1.0, dist)
    eval_live = decode_bytes(policy, EVAL_BATCH, spec, 0.0, dist)
    with LiveBytes() as finish:  # the end-of-run fingerprint, as the trainer computes it
        local_fingerprint(policy.net.parameters())
    largest = max(local_bytes([p]) for p in params)
    phases = {"build": weights,  # FSDP: built on the meta device, each rank's shards read
              "rollout": static + rollout_live,
              "update": static + live.peak,
              "evaluation": static + eval_live,
              "checkpoint": static,  # DCP: every rank writes its own shards, nothing is gathered
              "finish": static + finish.peak}
    host = {"load": largest,  # a tensor's slices at a time (DCP's Hugging Face reader), never the model
            "checkpoint": largest,  # DCP stages one tensor at a time to the host
            "load_whole_model": weights * dist.world,  # every rank's host before issue 25
            "checkpoint_gathered": static * dist.world}  # rank 0's host before issue 25 (model + AdamW)
    return {"params": sum(p.numel() for p in params), "static_bytes": static,
            "update_peak_bytes": live.peak, "saved_bytes": saved.peak,
            "grad_bytes": sum(p.numel() * p.element_size() for p in params),
            "per_rank_peak_bytes": static + live.peak,
            "phase_peak_bytes": phases, "rank_peak_bytes": max(phases.values()), "host_bytes": host}


def local_bytes(tensors: list[Any]) -> int:
    """Bytes of this rank's part of ``tensors`` (the local shard of a DTensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes()
               for t in tensors if isinstance(t, torch.Tensor))


EVAL_BATCH = 64
"""problems decoded at once by evaluation (``bgpo.rollout.evaluate``'s batch size)"""


def static_params(policy: DLLM) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*policy.net.parameters(), *policy.net.buffers()])


def decode_bytes(policy: DLLM, rows: int, spec: BatchSpec, temperature: float,
                 dist: Dist | None = None) -> int:
    """The peak bytes of the reference sampler decoding ``rows`` sequences at the batch's lengths
    (its per-step peak: one forward pass, the block's logits in float64 and their softmax), one
    step per block, inside ``full_params`` as the trainer decodes (FSDP: every block gathered
    whole); resident weights excluded."""
    from bgpo.sampler import SamplerConfig, generate

    blocks = max(spec.gen_length // spec.block_length, 1)
    cfg = SamplerConfig(spec.gen_length, spec.gen_length // blocks, blocks, temperature)
    ids = torch.full((rows, spec.prompt_length), policy.eos_token_id, dtype=torch.long)
    with LiveBytes() as live, torch.no_grad(), (dist or Dist()).full_params(policy.net):
        generate(policy, ids, torch.ones_like(ids), cfg, torch.Generator().manual_seed(0))
    return live.peak


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
PAPER_BLOCK = 32  # sweeps/paper_main.yaml: task.block_length (activation checkpointing on)


def jobs(a: argparse.Namespace) -> list[tuple[str | None, str, int, BatchSpec]]:
    """(task, method, n_t, batch of one rank) of each planned point."""
    if not a.paper:
        spec = BatchSpec(prompts=a.prompts, group=a.group, prompt_length=a.prompt_length,
                         gen_length=a.gen_length, block_length=a.block_length)
        return [(None, m, int(n), spec) for m in a.methods.split(",") for n in a.mc.split(",")]
    from bgpo.paper_settings import paper_mc, paper_task

    return [(task, m, paper_mc(cls, task), BatchSpec(prompts=PAPER_PROMPTS // PAPER_WORLD, group=PAPER_GROUP,
                                                     prompt_length=a.prompt_length,
                                                     gen_length=paper_task(task, "gen_length"),
                                                     block_length=PAPER_BLOCK))
            for task in PAPER_TASKS for m, cls in PAPER_METHODS.items()]


# ---- sizing the Slurm preset from the plan (issue 25.1) --------------------------------------------
# Stated assumptions (no GPU was at hand to measure them): what the plan cannot count.
HOST_BASE_GB = 6.0
"""one rank's host memory besides the model: Python, torch and the CUDA context, tokenizer, data, lm-eval"""
SUSTAINED_TFLOPS = 300.0
"""bf16 matmul throughput one H100 sustains on these shapes (~30% of its dense peak)"""
FS_GB_PER_S = 1.0
"""one rank's write bandwidth to the shared file system (every rank writes its own shard at once)"""
CKPT_SHARE = 0.05
"""the largest share of training time spent writing checkpoints"""


def step_seconds(row: dict[str, Any], diffusion_steps: int) -> float:
    """Planned seconds of one RL step on a rank: the rollout's ``diffusion_steps`` forward passes
    over the rank's sequences, then n_t forward + backward passes (×4 with activation
    checkpointing: forward, recomputed forward, backward = 2 forwards), 2 FLOPs per parameter and
    token, at ``SUSTAINED_TFLOPS``."""
    tokens = row["batch_sequences"] * (row["prompt_length"] + row["gen_length"])
    forward = 2.0 * row["params"] * tokens
    update = row["mc"] * forward * (4 if row["activation_checkpointing"] else 3)
    return (diffusion_steps * forward + update) / (SUSTAINED_TFLOPS * 1e12)


def slurm_sizing(rows: list[dict[str, Any]], tasks_per_node: int,
                 diffusion_steps: dict[str | None, int]) -> dict[str, Any]:
    """``mem_gb``, ``signal_delay_s`` (USR2 before the time limit: finish the step, write the
    checkpoint) and ``ckpt_every`` (checkpoints at most ``CKPT_SHARE`` of the time) for the
    planned jobs, from the plan's host bytes, checkpoint shard bytes and step FLOPs."""
    host_rank = HOST_BASE_GB * GB + max(max(r["host_bytes"]["load"], r["host_bytes"]["checkpoint"])
                                        for r in rows)
    step_s = max(step_seconds(r, diffusion_steps[r.get("task")]) for r in rows)
    write_s = max(r["static_bytes"] / (FS_GB_PER_S * GB) for r in rows)  # a rank's shards (its static bytes)
    every = max(1, math.ceil(write_s / (CKPT_SHARE * min(step_seconds(r, diffusion_steps[r.get("task")])
                                                         for r in rows))))
    return {"mem_gb": math.ceil(1.25 * tasks_per_node * host_rank / GB),
            "signal_delay_s": 60 * math.ceil(1.5 * (step_s + write_s) / 60),
            "ckpt_every": every, "step_s_max": round(step_s, 1), "ckpt_write_s": round(write_s, 1),
            "assumptions": {"host_base_gb": HOST_BASE_GB, "sustained_tflops": SUSTAINED_TFLOPS,
                            "fs_gb_per_s": FS_GB_PER_S, "ckpt_share": CKPT_SHARE}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bgpo.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=MODELS)
    p.add_argument("--methods", default="bgpo,vrpo")
    p.add_argument("--mc", default="1,2,4,8,16,32")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=16, help="(--paper: 256 unless given)")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--block-length", type=int, default=8, help="the sampler's block (rollout, evaluation)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="model.activation_checkpointing (--paper: on, as sweeps/paper_main.yaml)")
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
    for key in ("world", "prompts", "group", "prompt_length", "gen_length", "block_length", "layers"):
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
                          None if a.paper else a.layers, "adamw" if a.paper else a.optimizer,
                          a.paper or a.activation_checkpointing)
        row.update({"task": task} if task else {})
        row["fits"] = {f"{g:g}GB": row["rank_peak_bytes"] <= g * GB for g in gpus}
        row["cmd"] = "python -m bgpo.plan " + " ".join(sys.argv[1:] if argv is None else argv)
        rows.append(row)
        phases = ", ".join(f"{k} {v / GB:.1f}" for k, v in row["phase_peak_bytes"].items())
        print(f"{task or '':10s} {method:10s} n_t={n_t:3d} "
              f"per-rank peak {row['rank_peak_bytes'] / GB:6.2f} GB ({phases}; "
              f"saved {row['saved_bytes'] / GB:.3f}) fits {row['fits']}", flush=True)
    if a.paper:
        from bgpo.paper_settings import paper_task

        sizing = slurm_sizing(rows, PAPER_WORLD, {t: paper_task(t, "diffusion_steps") for t in PAPER_TASKS})
        print(f"[bgpo.plan] Slurm sizing for {PAPER_WORLD} tasks a node: {json.dumps(sizing)}")
        for r in rows:
            r["slurm"] = sizing
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
