"""Paths that must survive a full-scale (8B) run, checked on CPU (issue 25, item 1).

- The end-of-run parameter fingerprint is computed one parameter (one chunk) at a time from the
  local shards, never as one float64 copy of the whole model: at LLaDA-8B's shapes (on the meta
  device, where nothing is allocated) the float64 memory it holds at once is a few chunks, where
  the former ``torch.cat`` of every parameter in float64 held 128 GB.
- An out-of-memory (or other machine) error while loading a checkpoint is never taken for a
  corrupt file: the file is kept and the error propagates; a file that fails to parse is still set
  aside as ``*.corrupt``, named in the log.
- ``mem/peak_bytes`` is each step's peak: the counter is reset at the start of every RL step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bgpo.checkpoints as checkpoints
import bgpo.parallel as parallel
import bgpo.results as results
import bgpo.trainer as trainer
from bgpo.parallel import Dist
from bgpo.train import run
from tests.helpers import micro_model
from tests.test_trainer import cfg_of


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


# ---- the fingerprint ----------------------------------------------------------------------------
class Allocations(TorchDispatchMode):
    """Bytes of the new storages the operators inside allocate: the largest one and the most held
    at once (a storage counts until the tensor that brought it is freed). Works on the meta device,
    where nothing is really allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = {t.untyped_storage()._cdata for t in inputs}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage()._cdata in seen:
                continue  # a view or an in-place result: no new memory
            seen.add(t.untyped_storage()._cdata)
            n = t.untyped_storage().nbytes()
            self.live += n
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, n)
            weakref.finalize(t, self._free, n)
        return out


@pytest.fixture(scope="module")
def llada_8b_on_meta() -> torch.nn.Module:
    from bgpo.models import LLaDAModelLM

    with torch.device("meta"):  # LLaDA-8B's 291 tensors, 8.0e9 parameters, no memory
        return LLaDAModelLM(LLaDAModelLM.config_class())


def test_fingerprint_at_8b_shape_holds_a_few_chunks_not_the_model(llada_8b_on_meta):
    params = list(llada_8b_on_meta.parameters())
    numel = sum(p.numel() for p in params)
    assert numel > 8e9 and all(p.is_meta for p in params)
    largest_param = max(p.numel() * p.element_size() for p in params)  # the float32 embedding: 2 GB
    with Allocations() as new:
        sharded, whole = parallel.local_fingerprint(params)
    assert sharded.shape == whole.shape == (2,) and whole.dtype == torch.float64
    # what it holds at once: a float64 chunk and its reductions, whatever the model's size
    assert new.peak <= 2 * parallel.FINGERPRINT_CHUNK * 8 + 4096, new.peak
    assert new.peak < largest_param / 8  # far below even one parameter
    # the former code, measured the same way: every parameter in float64, then their concatenation
    with Allocations() as old:
        flat = torch.cat([Dist.full(p).double().flatten() for p in params])
        flat.sum(), flat.square().sum()
    assert old.largest >= 8 * numel and old.peak >= 16 * numel  # > 128 GB: out of memory on any GPU


def test_fingerprint_equals_the_whole_model_formula():
    """Per parameter, per chunk, the same numbers as the float64 sum over the concatenated model
    (to float64 round-off), for chunks smaller and larger than the parameters."""
    net = micro_model(dtype=torch.float32).net
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    want = [flat.sum().item(), flat.square().sum().item()]
    assert Dist().fingerprint(net.parameters()) == pytest.approx(want, rel=1e-12)
    for chunk in (7, 1000, 10**9):
        sharded, whole = parallel.local_fingerprint(net.parameters(), chunk=chunk)
        assert sharded.tolist() == [0.0, 0.0]  # no FSDP shards in one process
        assert whole.tolist() == pytest.approx(want, rel=1e-12)
    assert Dist().all_sum(torch.ones(2, dtype=torch.float64)).tolist() == [1.0, 1.0]  # one process


# ---- loading checkpoints: out of memory is not corruption ---------------------------------------
def loader_errors(tmp_path: Path) -> list[BaseException]:
    """What torch.load raises on torn, garbage, empty and zero-filled files (with and without mmap)."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    errors = []
    for i, data in enumerate([good.read_bytes()[:1000], b"not a checkpoint", b"", bytes(5000),
                              b"\x80\x02garbage"]):
        bad = tmp_path / f"bad{i}.pt"
        bad.write_bytes(data)
        for mmap in (True, False):
            with pytest.raises(Exception) as e:  # noqa: PT011
                torch.load(bad, map_location="cpu", weights_only=False, mmap=mmap)
            errors.append(e.value)
    return errors


OOM = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 GiB"),
       RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
       MemoryError(), RuntimeError("CUDA error: an illegal memory access was encountered"),
       OSError(5, "Input/output error")]


def test_machine_errors_are_told_from_unparsable_files(tmp_path):
    assert all(results.machine_error(e) for e in OOM)
    assert not any(results.machine_error(e) for e in loader_errors(tmp_path))
    assert not results.machine_error(ValueError("not a trainer checkpoint"))


def raising(error: BaseException):
    real = torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith(".pt"):
            raise error
        return real(path, *args, **kwargs)
    return load


@pytest.mark.parametrize("error", OOM[:3], ids=["cuda oom", "host oom", "MemoryError"])
def test_out_of_memory_while_resuming_keeps_the_checkpoints(error, tmp_path, monkeypatch, caplog):
    """``resume_state`` (every rank loads the checkpoint): an 8B checkpoint that does not fit stops
    the run with that error; last.pt and prev.pt keep their names (before: both renamed *.corrupt
    and the run restarted from step 0)."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name, step in (("last.pt", 2), ("prev.pt", 1)):
        state = {"step": step, "model": {}, "opt": {}, "sched": {}, "rng": torch.get_rng_state()}
        torch.save(state, ckpt / name)
    rows = [{"step": s, "reward": 0.0} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(torch, "load", raising(error))
    with caplog.at_level(logging.ERROR), pytest.raises(type(error)) as got:
        checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key")
    assert got.value is error and any("nothing was set aside" in n for n in getattr(error, "__notes__", []))
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "prev.pt"]
    assert f"{ckpt / 'last.pt'}: could not be loaded" in caplog.text
    monkeypatch.undo()  # the same folder with the memory: resumes from last.pt
    assert checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key")["step"] == 2


class OtherRankOutOfMemory(Dist):
    """Rank 0 of 2, where rank 1 ran out of memory loading the same file (what it gathers)."""

    def gather(self, values):
        assert values == [None]  # the only gather before the error: "did the load fail?"
        return [None, "OutOfMemoryError: CUDA out of memory"]


def test_out_of_memory_on_another_rank_stops_this_one_too(tmp_path):
    """A rank whose load succeeded does not go on into a collective the failed rank never joins:
    it raises too, naming the rank, and nothing is set aside."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    state = {"step": 2, "model": {}, "opt": {}, "sched": {}, "rng": torch.get_rng_state()}
    torch.save(state, ckpt / "last.pt")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(3)))
    two = OtherRankOutOfMemory(rank=0, world=2)
    with pytest.raises(RuntimeError, match="rank 1 could not load it .OutOfMemoryError"):
        checkpoints.resume_state(tmp_path, 4, "cpu", two, "key")
    net = torch.nn.Linear(2, 2)
    torch.save({"step": 3, "model": net.state_dict(), "run": "key"}, ckpt / "best.pt")
    with pytest.raises(RuntimeError, match="rank 1 could not load it"):
        checkpoints.load_weights(ckpt / "best.pt", 3, two, net, "key")
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt"]


def test_out_of_memory_loading_the_selected_weights_keeps_them(tmp_path, monkeypatch, caplog):
    best, net, trained = tmp_path / "best.pt", torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.save({"step": 3, "model": trained.state_dict(), "run": "key"}, best)
    monkeypatch.setattr(torch, "load", raising(OOM[0]))
    with pytest.raises(torch.OutOfMemoryError):
        checkpoints.load_weights(best, 3, Dist(), net, "key")
    assert best.exists() and not list(tmp_path.glob("*.corrupt"))
    monkeypatch.undo()
    assert checkpoints.load_weights(best, 3, Dist(), net, "key")
    assert torch.equal(net.weight, trained.weight)
    best.write_bytes(b"not a checkpoint")  # a file that fails to parse: set aside, named
    with caplog.at_level(logging.WARNING):
        assert not checkpoints.load_weights(best, 3, Dist(), net, "key")
    assert (tmp_path / "best.pt.corrupt").exists() and f"{best}: unreadable" in caplog.text


def test_garbage_checkpoint_is_still_set_aside_when_resuming(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key") is None
    assert (ckpt / "last.pt.corrupt").exists() and f"{ckpt / 'last.pt'}: unreadable checkpoint" in caplog.text


# ---- peak memory per step -----------------------------------------------------------------------
def test_peak_memory_is_reset_every_step_and_the_fingerprint_is_the_sharded_one(base_model, tmp_path,
                                                                                monkeypatch):
    events, fingerprints = [], []
    real_peak = trainer.peak_bytes
    real_reset = getattr(trainer, "reset_peak", lambda device: None)
    real_fp = getattr(Dist, "fingerprint", lambda self, params: None)
    monkeypatch.setattr(trainer, "reset_peak", lambda device: (events.append("reset"), real_reset(device))[1],
                        raising=False)
    monkeypatch.setattr(trainer, "peak_bytes", lambda device: (events.append("peak"), real_peak(device))[1])
    monkeypatch.setattr(Dist, "fingerprint", lambda self, params: fingerprints.append(real_fp(self, params))
                        or fingerprints[-1], raising=False)
    big = torch.ones(3 * 2**27)  # 1.5 GB touched, then freed: a load-time peak
    del big
    before = real_peak("cpu")
    summary = run(cfg_of(base_model, tmp_path, "method=bgpo", "eval_every=0"))
    assert events == ["reset", "peak"] * 3  # each step's row after that step's reset
    assert summary["param_fingerprints"] == fingerprints  # the memory-safe fingerprint is the one reported
    lines = (tmp_path / summary["run"] / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    peaks = [r["mem/peak_bytes"] for r in rows if r["step"] > 0]
    assert len(peaks) == 3 and all(p > 0 for p in peaks)
    if os.access("/proc/self/clear_refs", os.W_OK):  # Linux: the resident-set peak can be reset
        assert all(p < before - 2**30 for p in peaks), (peaks, before)  # not the 1.5 GB peak before the run


def test_cuda_peak_is_reset_on_the_step_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: calls.append(("peak", d)) or 7)
    trainer.reset_peak("cuda:1")
    assert trainer.peak_bytes("cuda:1") == 7 and calls == [("reset", "cuda:1"), ("peak", "cuda:1")]


# ---- evaluation over every rank, and a process-group timeout for it ---------------------------
def test_evaluation_split_over_ranks_equals_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank evaluates every world-th batch of the one-process split; gathered, every rank has
    exactly the one-process result (two ranks played in turn, the gather joining their parts)."""
    import bgpo.rollout as rollout_mod
    from bgpo.config import TaskConfig
    from tests.toy_task import ToyTask

    model, task = micro_model(dtype=torch.float64), ToyTask()
    cfg = TaskConfig(name="toy", gen_length=8, block_length=4, diffusion_steps=4)
    problems = task.train_examples(7, 3)
    one = rollout_mod.evaluate(model, task, problems, cfg, batch_size=2)
    real, calls = rollout_mod.rollout, []
    monkeypatch.setattr(rollout_mod, "rollout", lambda m, t, exs, *a, **k: calls.append(len(exs)) or real(
        m, t, exs, *a, **k))
    parts: list = []
    rank1 = rollout_mod.evaluate(model, task, problems, cfg, batch_size=2, rank=1, world=2,
                                 gather=lambda mine: parts.extend(mine) or mine)
    assert calls == [2, 1]  # rank 1: batches 1 and 3 of four (the last holds one problem)
    rank0 = rollout_mod.evaluate(model, task, problems, cfg, batch_size=2, rank=0, world=2,
                                 gather=lambda mine: mine + parts)
    assert calls == [2, 1, 2, 2]  # rank 0: batches 0 and 2
    assert rank0 == one and rank0["n"] == 7 and len(rank0["per_problem"]["accuracy"]) == 7
    assert rank1["n"] == 7  # a rank's own view before the real gather: its batches only
    with pytest.raises(ValueError, match="needs their gather"):
        rollout_mod.evaluate(model, task, problems, cfg, rank=0, world=2)


def test_the_process_group_waits_long_enough_for_a_test_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(parallel.TIMEOUT_ENV, raising=False)
    assert parallel.pg_timeout().total_seconds() == 4 * 3600  # NCCL's default is 600 s
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "90")
    assert parallel.pg_timeout().total_seconds() == 90
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv(parallel.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=parallel.TIMEOUT_ENV):
            parallel.pg_timeout()


def test_weights_load_straight_onto_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the checkpoint is loaded shard by shard onto the rank's device (``device_map``):
    no rank builds the whole model on the host first. On CPU nothing changes."""
    from bgpo.model import NATIVE, load_dllm
    from tests.test_native_models import folder

    path, seen = folder("llada"), []

    class Stop(Exception):
        pass

    def record(cls: type, *_a: object, **kw: object) -> None:
        seen.append(kw.get("device_map"))
        raise Stop

    monkeypatch.setattr(NATIVE["llada"], "from_pretrained", classmethod(record))
    for device in ("cuda:3", "cpu"):
        with pytest.raises(Stop):
            load_dllm("llada", path, device=device)
    assert seen == [{"": "cuda:3"}, None]


def test_a_bad_process_group_timeout_stops_at_start_up() -> None:
    import subprocess
    import sys

    env = {**os.environ, parallel.TIMEOUT_ENV: "soon"}
    res = subprocess.run([sys.executable, "-m", "bgpo.train", "validate_only=true"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2 and "BGPO_DIST_TIMEOUT_S='soon' must be a positive number" in res.stderr


# ---- sharded checkpoints (parallel=fsdp writes last.dcp) ---------------------------------------
def sharded_run(tmp_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Path]:
    """A run folder with ``last.dcp`` (step 2) and ``prev.dcp`` (step 1) of a small network."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = tmp_path / "checkpoints" / "last.dcp"
    for step in (1, 2):
        net(torch.randn(3, 4)).sum().backward()
        opt.step()
        checkpoints.save_checkpoint(ckpt, Dist(), net, opt, sched, step, [], ["abc"], "key")
    rows = [{"step": s, "reward": 0.0} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return net, opt, ckpt


def test_a_sharded_checkpoint_resumes_the_model_and_the_optimizer(tmp_path):
    net, opt, ckpt = sharded_run(tmp_path)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.dcp", "prev.dcp"]
    state = checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key")
    assert state["step"] == 2 and state["commits"] == ["abc"]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoints.load_into(state, Dist(), fresh, fresh_opt)
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])
    assert results.load_checkpoint(ckpt)["model"].keys() == net.state_dict().keys()  # export's reader


def test_a_sharded_checkpoint_missing_a_shard_is_set_aside_and_prev_used(tmp_path, caplog):
    _, _, ckpt = sharded_run(tmp_path)
    next(ckpt.glob("*.distcp")).unlink()  # a shard lost (a node's disk, a partial copy)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key")["step"] == 1
    assert (ckpt.parent / "last.dcp.corrupt").is_dir() and "shard files missing" in caplog.text


def test_out_of_memory_reading_a_sharded_checkpoint_keeps_it(tmp_path, monkeypatch):
    _, _, ckpt = sharded_run(tmp_path)
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda p, *a, **k: (_ for _ in ()).throw(OOM[1])
                        if str(p).endswith("header.pt") else real(p, *a, **k))
    with pytest.raises(type(OOM[1])):
        checkpoints.resume_state(tmp_path, 4, "cpu", Dist(), "key")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.dcp", "prev.dcp"]


# ---- FSDP ranks build on the meta device and read only their shards ----------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["tiny", "llada", "dream"])
def test_a_model_built_empty_then_materialized_equals_the_loaded_one(kind, dtype, base_model):
    """``load_dllm(empty=True)`` reads no weight (every parameter on the meta device); ``materialize``
    then reads them from the safetensors files through DCP's Hugging Face reader — here one process
    holding all of it; under FSDP each rank reads only its slices (``test_distributed`` checks the
    2-rank run against one process). The logits equal those of the ordinary load, the published
    fixtures' included."""
    from bgpo.model import load_dllm
    from tests.test_native_models import ARCHS, folder

    path = base_model if kind == "tiny" else folder(kind)
    mask = None if kind == "tiny" else ARCHS[kind][1]
    full = load_dllm(kind, path, dtype, mask_token_id=mask)  # a float32 checkpoint, loaded in ``dtype``
    empty = load_dllm(kind, path, dtype, mask_token_id=mask, empty=True)
    assert {p.device.type for p in empty.net.parameters()} == {"meta"}
    Dist().materialize(empty.net, path)
    ids = torch.randint(0, full.net.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(full.net.named_buffers(), empty.net.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # e.g. Gemma3's embed_scale in the model dtype
    with torch.no_grad():
        assert torch.equal(full.net(ids).logits, empty.net(ids).logits)


def test_llada_8b_is_built_empty_in_no_memory(tmp_path):
    """At LLaDA-8B's published config the empty build allocates nothing for its 8.0e9 parameters
    (each FSDP rank then allocates 1/world of them): the host never holds the model."""
    from bgpo.model import load_dllm
    from bgpo.models import LLaDAModelLM
    from tests.test_native_models import folder

    LLaDAModelLM.config_class().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder("llada") / name).read_bytes())
    trainer.reset_peak("cpu")
    before = trainer.peak_bytes("cpu")  # this process's resident set now (Linux: VmHWM just reset)
    net = load_dllm("llada", tmp_path, "float32", empty=True).net
    assert sum(p.numel() for p in net.parameters()) > 8.0e9
    assert trainer.peak_bytes("cpu") - before < 1e9  # buffers only (RoPE tables), not 32 GB of weights


def test_a_checkpoint_lacking_a_parameter_is_refused_by_name(base_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from bgpo.model import load_dllm

    shutil.copytree(base_model, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    empty = load_dllm("tiny", tmp_path / "m", "float32", empty=True)
    with pytest.raises(ValueError, match="lack model.layers.0.mlp.up_proj.weight"):
        Dist().materialize(empty.net, tmp_path / "m")
