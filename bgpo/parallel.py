"""Process layout and gradient reduction of the RL trainer: one process, DDP-style, or FSDP.

Processes are started by ``torchrun`` (or ``accelerate launch``), or as the tasks of one Slurm job
(``hydra.launcher.tasks_per_node=N``: ``export_launcher_env``); accelerate sets up the process
group (gloo on CPU, NCCL on GPU). ``parallel`` (a top-level config key) picks how the model lives
on the ranks:

- ``ddp``: every rank holds the whole model. Gradients are summed locally over shards and MC
  samples, then all-reduced ONCE per optimizer step as one flat buffer — no DDP hooks, so BGPO's
  per-sample backward passes never communicate (what ``no_sync()`` on all but the last pass
  gives). N processes compute bit for bit what one process with N shards computes.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, what BGPO's VeRL setup uses), one unit
  per transformer block (the HF ``_no_split_modules`` classes) plus the root. Parameters,
  gradients and optimizer state are sharded; every backward pass reduce-scatters its gradient into
  the local shard. This is deliberate: deferring the reduction to the last pass (FSDP2's
  ``set_requires_gradient_sync(False)``) would keep an UNSHARDED gradient on every rank — 32 GB in
  float32 for LLaDA-8B, the memory FSDP exists to save. Raise ``method.cfg.mc_chunk`` to trade
  BGPO's memory floor for fewer reductions. Results equal the one-process run up to the order of
  floating-point sums (a test checks 1e-9 in float64), not bit for bit.
  Rollouts and evaluation run inside ``full_params``: the blocks are gathered once and kept whole
  (as VeRL hands full weights to its rollout engine), so ranks may take different numbers of
  forward passes (threshold decoding, rank-0 evaluation) without a collective hanging.
  ``model.precision=bf16-mixed`` (issue 12): the sharded parameters, their gradients and AdamW
  state stay float32; FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
  gathers them as bfloat16 for compute (``full_params`` too) and reduce-scatters the gradients in
  float32. (On one process and under ``ddp`` the same precision is ``torch.autocast``,
  ``bgpo.model.apply_precision``; the flat all-reduce below is float32 for any model.)

accelerate's own FSDP path is not used: with ``Accelerator(cpu=True)`` it silently prepares DDP
instead (tried with accelerate 1.x), so it could not be tested on CPU, and the trainer's
once-per-step reduction is its own either way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def export_launcher_env() -> None:
    """In a submitit job of several tasks (``hydra.launcher.tasks_per_node=N``), export the env://
    variables torch.distributed reads (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), as
    torchrun would. Elsewhere, and under torchrun, nothing changes."""
    if "WORLD_SIZE" in os.environ:
        return
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks == 1:
            return
    except (ImportError, RuntimeError):  # not in a submitit job
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # accelerate: cuda:LOCAL_RANK


TIMEOUT_ENV = "BGPO_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600


def pg_timeout() -> timedelta:
    """How long a collective waits for the slowest rank: ``$BGPO_DIST_TIMEOUT_S``, default 4 hours
    (NCCL's own default, 10 minutes, is shorter than one rank's lm-eval test set at 8B while the
    others wait in the next collective)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


@dataclass
class Dist:
    """Process layout (one process: rank 0 of 1) and the model-parallel strategy."""

    rank: int = 0
    world: int = 1
    strategy: str = "ddp"
    device: str = "cpu"
    """this rank's device: ``cuda:<local rank>`` for several GPU processes"""

    @classmethod
    def from_env(cls, device: str, strategy: str = "ddp") -> Dist:
        """``strategy`` is ``cfg.parallel``, checked at start-up by ``bgpo.validate.validate_train``."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls(strategy=strategy, device=device)
        from accelerate import Accelerator, InitProcessGroupKwargs

        acc = Accelerator(cpu=device == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=pg_timeout())])
        local = "cpu" if acc.device.type == "cpu" else str(acc.device)  # accelerate says cpu:0
        return cls(acc.process_index, acc.num_processes, strategy, local)

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1

    # ---- the model on the ranks --------------------------------------------------------------
    def shard(self, net: nn.Module, param_dtype: torch.dtype | None = None,
              frozen: bool = False) -> nn.Module:
        """FSDP: shard every transformer block, then the root (in place); ``param_dtype``
        (bf16-mixed: bfloat16) is the dtype they compute in, gradients reduced in float32.
        ``frozen`` (the reference model, forward passes only): the root's own parameters (the
        embedding and LM head) are resharded after each forward too — FSDP2 keeps a root's
        gathered for the backward pass that never comes (2 GB a rank at LLaDA-8B in bf16, found
        by ``bgpo.plan``). Otherwise: unchanged."""
        if not self.fsdp:
            return net
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
            if param_dtype is not None else MixedPrecisionPolicy()
        blocks = block_classes(net)
        units = [m for m in net.modules() if type(m).__name__ in blocks]
        if not units:
            raise ValueError(f"parallel=fsdp: no transformer blocks ({sorted(blocks)}) found in "
                             f"{type(net).__name__}")
        for m in units:
            fully_shard(m, mp_policy=mp)
        fully_shard(net, mp_policy=mp, reshard_after_forward=True if frozen else None)
        return net

    def materialize(self, net: nn.Module, folder: str | Path) -> None:
        """Weights for a network built on the meta device (``load_dllm(empty=True)``) and sharded:
        each rank allocates its shards on its device and reads only their slices of the
        checkpoint's safetensors files (``torch.distributed.checkpoint``'s Hugging Face reader):
        no rank ever holds the whole model. Buffers (RoPE tables) keep the values they were built
        with. A parameter the files lack must be tied to one they hold (a tied LM head);
        otherwise one sentence names what is missing. Every rank calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )

        first: dict[int, str] = {}  # a tied parameter (one object, several names) -> its first name
        shared = {n: first.setdefault(id(p), n) for n, p in net.named_parameters(remove_duplicate=False)}
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        net.to_empty(device=self.device)  # one process: this unties; FSDP keeps one parameter
        with torch.no_grad():
            for n, b in net.named_buffers():
                b.copy_(buffers[n])
        for name, tied_to in shared.items():
            if name != tied_to and net.get_parameter(name) is not net.get_parameter(tied_to):
                owner, _, attr = name.rpartition(".")
                setattr(net.get_submodule(owner), attr, net.get_parameter(tied_to))
        reader = dcp.HuggingFaceStorageReader(str(folder))
        in_files = set(reader.read_metadata().state_dict_metadata)
        state = get_model_state_dict(net)
        lacking = sorted(k for k in state if k not in in_files and shared.get(k, k) not in in_files)
        if lacking:
            more = f" (+{len(lacking) - 3} more)" if len(lacking) > 3 else ""
            raise ValueError(f"{folder}: the checkpoint's safetensors files lack {', '.join(lacking[:3])}"
                             f"{more}: is it saved in the hub format of its model_type?")
        state = {k: v for k, v in state.items() if k in in_files}
        with self._quiet():
            dcp.load(state, storage_reader=reader, no_dist=self.world == 1)
        set_model_state_dict(net, state, options=StateDictOptions(strict=False))

    @contextlib.contextmanager
    def full_params(self, net: nn.Module) -> Iterator[None]:
        """FSDP: every block's parameters gathered once and kept whole inside the block (no
        collective per forward pass). Every rank must enter it; inside, ranks may run different
        numbers of forward passes. Otherwise: nothing to do."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in net.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True)

    @staticmethod
    def full(p: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a (possibly FSDP-sharded) parameter; a collective under FSDP."""
        return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()

    @staticmethod
    def local(p: torch.Tensor) -> torch.Tensor:
        """This rank's part of a (possibly FSDP-sharded) parameter."""
        return p.to_local() if hasattr(p, "to_local") else p

    # ---- fingerprint -----------------------------------------------------------------------
    def fingerprint(self, params: Iterable[torch.Tensor]) -> list[float]:
        """``[sum, sum of squares]`` of every parameter's entries, in float64: the same on every
        rank and in every layout (one process, ``ddp``, ``fsdp``) up to float64 round-off; under
        ``ddp`` each rank's own (its whole model), so ranks that drifted apart disagree. Memory:
        one chunk of one parameter at a time (``local_fingerprint``), never the model (the float64
        copy of LLaDA-8B alone is 64 GB); under FSDP each rank sums its shard and the two numbers
        are summed over ranks. Every rank must call it (a collective under FSDP)."""
        sharded, whole = local_fingerprint(params)
        if self.fsdp:
            sharded = self.all_sum(sharded)
        return (sharded + whole.to(sharded.device)).tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a small tensor (every rank gets the same bits); one process: ``t``."""
        if self.world == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    # ---- gradients -------------------------------------------------------------------------
    def grad_sum(self, params: list[nn.Parameter]) -> GradSum:
        return GradSum(self, params)

    def grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ---- small collectives -----------------------------------------------------------------
    def gather(self, values: list[Any]) -> list[Any]:
        if self.world == 1:
            return values
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, values)
        return [v for part in out for v in part]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a preemption signal: all ranks stop
        after the same step, or a collective of the next step would hang)."""
        return any(self.gather([flag]))

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dicts(self, net: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer state, keyed by parameter name; under FSDP on
        rank 0 only (the others get empty dicts). The same format in every layout."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        return get_state_dict(net, opt, options=opts)

    def model_state_dict(self, net: nn.Module) -> dict:
        """The full model state alone (a selected checkpoint), keyed as in ``state_dicts``; under FSDP
        on rank 0 only, offloaded to the CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        return get_model_state_dict(net, options=opts)

    def load_model_state_dict(self, net: nn.Module, model: dict) -> None:
        """Inverse of ``model_state_dict`` (rank 0's copy broadcast under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(net, model, options=StateDictOptions(full_state_dict=True,
                                                                  broadcast_from_rank0=self.fsdp))

    def save_sharded(self, folder: Path, net: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
        """``torch.distributed.checkpoint``: each rank writes its own shards of the model (and the
        optimizer's state) into ``folder``, fsynced; nothing is gathered. Every rank calls it."""
        import torch.distributed.checkpoint as dcp

        with self._quiet():
            writer = dcp.FileSystemWriter(str(folder), sync_files=True)
            dcp.save(self._sharded(net, opt), storage_writer=writer, no_dist=self.world == 1)

    def load_sharded(self, folder: Path, net: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
        """Inverse of ``save_sharded``: each rank reads the slices of ``folder`` its shards hold
        (written by any world size, or by one process)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._sharded(net, opt)
        with self._quiet():
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=self.world == 1)
        set_state_dict(net, opt or [], model_state_dict=state["model"],
                       optim_state_dict=state.get("opt", {}))

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """One process: DCP's warning that no process group exists says what is meant."""
        with warnings.catch_warnings():
            if self.world == 1:
                warnings.simplefilter("ignore", UserWarning)
            yield

    @staticmethod
    def _sharded(net: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
        """The model's (and optimizer's) state as this rank holds it: DTensor shards under FSDP."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if opt is None:
            return {"model": get_model_state_dict(net)}
        model, optim = get_state_dict(net, opt)
        return {"model": model, "opt": optim}

    def load_state_dicts(self, net: nn.Module, opt: torch.optim.Optimizer, model: dict,
                         optim: dict) -> None:
        """Inverse of ``state_dicts``; under FSDP rank 0's copy is broadcast and sliced into the
        shards (the others may pass what they mapped from the same file)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.fsdp)
        set_state_dict(net, opt, model_state_dict=model, optim_state_dict=optim, options=opts)


class GradSum:
    """Sums the gradients of one optimizer step over the shards this rank computes, then reduces
    them over ranks into ``p.grad`` as their mean over all shards.

        acc = dist.grad_sum(params)
        for shard in my_shards: method.backward(...); acc.add_shard()
        acc.reduce(n_shards)
    """

    def __init__(self, dist: Dist, params: list[nn.Parameter]) -> None:
        self.dist, self.params = dist, params
        for p in params:
            p.grad = None
        dtype = torch.promote_types(params[0].dtype, torch.float32)  # bf16 models sum in float32
        self.flat = None if dist.fsdp else torch.zeros(sum(p.numel() for p in params),
                                                      device=params[0].device, dtype=dtype)

    def add_shard(self) -> None:
        """ddp: move this shard's gradient into the flat buffer (shard by shard: the same sums on
        1 or N processes). fsdp: nothing — FSDP already accumulates into the sharded ``p.grad``."""
        if self.flat is None:
            return
        self.flat += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in self.params])
        for p in self.params:
            p.grad = None

    def reduce(self, n_shards: int) -> None:
        if self.flat is None:  # fsdp: each reduce-scatter averaged over ranks; make it over shards
            scale = self.dist.world / n_shards
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            return
        if self.dist.world > 1:
            torch.distributed.all_reduce(self.flat)
        self.flat /= n_shards
        for p, g in zip(self.params, self.flat.split([q.numel() for q in self.params]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)


FINGERPRINT_CHUNK = 1 << 22
"""entries of a parameter turned into float64 at once by ``local_fingerprint`` (32 MiB)"""


@torch.no_grad()
def local_fingerprint(params: Iterable[torch.Tensor], chunk: int = FINGERPRINT_CHUNK,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's float64 ``[sum, sum of squares]`` of ``params``, split in two: over the local
    shards of FSDP-sharded parameters (DTensors: to be summed over ranks) and over the plain ones
    (whole on every rank). One parameter at a time, ``chunk`` entries at a time: the memory it
    takes is a few float64 chunks, whatever the model's size; one tensor per part, on the
    parameters' device (no host sync until the caller reads it)."""
    acc: dict[bool, torch.Tensor] = {}
    for p in params:
        is_shard = hasattr(p, "to_local")
        x = (p.to_local() if is_shard else p).detach().reshape(-1)
        a = acc.setdefault(is_shard, torch.zeros(2, dtype=torch.float64, device=x.device))
        for part in x.split(chunk):
            d = part.to(torch.float64)
            a[0] += d.sum()
            a[1] += torch.dot(d, d)
    some = next(iter(acc.values()), torch.zeros(2, dtype=torch.float64))
    return (acc.get(True, torch.zeros_like(some)), acc.get(False, torch.zeros_like(some)))


def block_classes(net: nn.Module) -> set[str]:
    """The transformer-block class names of a (possibly peft-wrapped) HF model."""
    names: set[str] = set()
    for m in net.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names
