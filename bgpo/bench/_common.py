"""Shared pieces of the estimator benchmarks (``memory``, ``variance``): the model under test,
the methods built from the Hydra configs, a fixed rollout batch, the rows file.

A model is either the embedded tiny model (``--model tiny``: the cached Countdown base model when
it exists, else a freshly initialised one of the same shape: memory and time do not depend on the
weight values), a bidirectional Gemma3 built with random weights from ``--arch``
(``hidden=4096,layers=32,heads=32,intermediate=12288,vocab=126464,tied=0``), or the suite's NATIVE
LLaDA / Dream class with random weights (``--arch llada8b``: ``LLaDAModelLM(LLaDAConfig())``, i.e.
LLaDA-8B as the LLaDA paper, arXiv 2502.09992, and its hub config give it; ``dream7b``; or
``native=llada,hidden=64,layers=2,...`` for any shape), initialised directly on the device,
optionally LoRA-wrapped. ``--precision`` (``model.precision``: fp32, bf16-mixed = float32 weights
+ bfloat16 autocast, bf16-pure = ``--dtype bfloat16``) and ``--activation-checkpointing``
(``model.activation_checkpointing``) are the trainer's options.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bgpo.elbo import Batch
from bgpo.model import (
    _DTYPES,
    DLLM,
    PRECISIONS,
    SPECIALS,
    apply_lora,
    apply_precision,
    build_char_tokenizer,
    enable_activation_checkpointing,
    load_dllm,
    tiny_config,
)

METHODS = ("bgpo", "vrpo", "diffu_grpo", "wd1", "spg", "espo", "coupled_grpo", "tracerl", "just_grpo")
CHUNKED = ("bgpo", "vrpo", "tracerl", "just_grpo")  # methods with a method.cfg.mc_chunk
ARCH_PRESETS = {
    # the native classes with their default configs: LLaDA-8B-Instruct's and Dream-7B's hub shapes
    "llada8b": "native=llada",
    "dream7b": "native=dream",
}
ARCH_KEYS = ("hidden", "layers", "heads", "intermediate", "vocab", "kv_heads", "tied", "max_len")
NATIVE_KEYS = {  # --arch key -> the native config's field
    "llada": {"hidden": "d_model", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
              "intermediate": "mlp_hidden_size", "vocab": "vocab_size"},
    "dream": {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
              "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size", "vocab": "vocab_size"},
}


# ---- parsing ------------------------------------------------------------------------------------
def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def strs(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_arch(s: str) -> dict[str, Any]:
    """``hidden=..,layers=..,heads=..,intermediate=..,vocab=..[,kv_heads=..,tied=0|1,max_len=..]``
    (a bidirectional Gemma3), or ``native=llada|dream[,KEY=INT...]`` (the native class, its
    defaults = the published 8B / 7B shape, overridden by the keys given), or a preset."""
    s = ARCH_PRESETS.get(s, s)
    arch: dict[str, Any] = {}
    for part in strs(s):
        key, _, val = part.partition("=")
        if key == "native" and val in NATIVE_KEYS:
            arch[key] = val
            continue
        if key not in ARCH_KEYS or not val.lstrip("-").isdigit():
            raise ValueError(f"--arch: {part!r} is not KEY=INT with KEY in {list(ARCH_KEYS)}, nor "
                             f"native=llada|dream (or a preset: {list(ARCH_PRESETS)})")
        arch[key] = int(val)
    if "native" in arch:
        bad = set(arch) - {"native", *NATIVE_KEYS[arch["native"]]}
        if bad:
            raise ValueError(f"--arch: {sorted(bad)} do not apply to native={arch['native']}")
        return arch
    missing = {"hidden", "layers", "heads", "intermediate"} - set(arch)
    if missing:
        raise ValueError(f"--arch needs {sorted(missing)}")
    return arch


def command_line(bench: str, argv: list[str]) -> str:
    """The command that regenerates a results file (recorded as ``cmd`` in every row)."""
    return " ".join(["python -m bgpo.bench", bench, *map(shlex.quote, argv)])


def argv_of(argv: list[str] | None) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


def check_model_args(parser: Any, args: Any) -> None:
    """The model options every benchmark shares: a clear argparse error for a bad --arch/--dtype."""
    try:
        if args.arch:
            parse_arch(args.arch)
        if args.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"--dtype={args.dtype!r} is not one of float32, bfloat16, float16, float64")
        precision = getattr(args, "precision", None)
        if precision is not None:
            if precision not in PRECISIONS:
                raise ValueError(f"--precision={precision!r} is not one of {list(PRECISIONS)}")
            if args.dtype not in PRECISIONS[precision]:
                allowed = " or ".join(PRECISIONS[precision])
                raise ValueError(f"--precision={precision} needs --dtype {allowed}")
    except ValueError as e:
        parser.error(str(e))


def bench_main(bench: str, argv: list[str] | None, parse: Any, run: Any, summary: Any) -> int:
    """Shared entry of the benchmarks: parse, run with ``--threads`` torch threads (restored
    afterwards), print where the rows went and their summary."""
    argv = argv_of(argv)
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path, rows = run(args, command_line(bench, argv))
    finally:
        torch.set_num_threads(threads)
    print(f"[bench {bench}] {len(rows)} rows -> {path}")
    print(summary(rows))
    return 0


# ---- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the model under test again (in a fresh process)."""

    name: str
    path: str | None = None  # a saved tiny / HF folder (tiny kind)
    arch: dict[str, Any] | None = None  # random bidirectional Gemma3 of this shape, or a native class
    dtype: str = "float32"
    device: str = "cpu"
    lora: int = 0  # LoRA rank (0: full fine-tuning); alpha = r/2, dropout 0.05 (d1)
    seed: int = 0
    precision: str | None = None  # model.precision (None: fp32, or bf16-pure for --dtype bfloat16)
    activation_checkpointing: bool = False

    @property
    def resolved_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        return "bf16-pure" if self.dtype == "bfloat16" else "fp32"


def model_spec(model: str, arch: str | None, name: str | None, dtype: str, device: str, lora: int,
               seed: int, task: str = "countdown", precision: str | None = None,
               activation_checkpointing: bool = False) -> ModelSpec:
    """``--model tiny`` (the shipped, else cached, base model of ``task``) or a folder; ``--arch`` wins."""
    from bgpo.provision import pick_device, tiny_base

    if dtype not in _DTYPES or dtype == "auto":
        raise ValueError(f"--dtype={dtype!r} is not one of {[d for d in _DTYPES if d != 'auto']}")
    device = pick_device(device)
    extra = dict(precision=precision, activation_checkpointing=activation_checkpointing)
    if arch:
        a = parse_arch(arch)
        default_name = arch if arch in ARCH_PRESETS else (
            f"{a['native']}-h{a.get('hidden', 'd')}l{a.get('layers', 'd')}" if "native" in a
            else f"h{a['hidden']}l{a['layers']}")
        return ModelSpec(name or default_name, None, a, dtype, device, lora, seed, **extra)
    if model == "tiny":
        path = tiny_base(task)
        if (path / "config.json").exists():
            return ModelSpec(name or "tiny", str(path), None, dtype, device, lora, seed, **extra)
        from bgpo.config import ModelConfig

        m = ModelConfig()  # the tiny architecture, fresh weights (memory/time do not depend on them)
        a = dict(hidden=m.hidden, layers=m.layers, heads=m.heads, intermediate=m.intermediate)
        return ModelSpec(name or "tiny", None, a, dtype, device, lora, seed, **extra)
    return ModelSpec(name or Path(model).name, model, None, dtype, device, lora, seed, **extra)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def native_model(arch: dict[str, Any], dtype: torch.dtype, device: str) -> DLLM:
    """The native LLaDA / Dream class with random weights, built on ``device`` in ``dtype``: its
    default config (the published 8B / 7B shape) with ``arch``'s keys; the char tokenizer (token
    ids are random in the benchmarks) and the config's mask id (the last id if it is out of range)."""
    from bgpo.models import NATIVE

    kind = arch["native"]
    cls = NATIVE[kind]
    fields = {NATIVE_KEYS[kind][k]: v for k, v in arch.items() if k != "native"}
    if "vocab_size" in fields:  # a small vocabulary: the special ids move to its top
        V = fields["vocab_size"]
        fields.update(mask_token_id=V - 1, pad_token_id=V - 2, eos_token_id=V - 2, bos_token_id=V - 2)
        if kind == "llada":
            fields["embedding_size"] = V
    config = cls.config_class(**fields)
    with torch.device(device), _default_dtype(dtype):  # initialise on the device, in dtype
        net = cls(config)
    return DLLM.wrap(net.to(dtype), build_char_tokenizer(), kind=kind, mask_token_id=config.mask_token_id)


def load_model(spec: ModelSpec) -> DLLM:
    """Build the model of ``spec`` on its device (random weights are initialised there), with its
    precision and activation checkpointing."""
    if spec.path is not None:
        model = load_dllm("tiny", spec.path, spec.dtype, spec.device)
    elif spec.arch is not None and "native" in spec.arch:
        torch.manual_seed(spec.seed)
        model = native_model(spec.arch, _DTYPES[spec.dtype], spec.device)
    else:
        from transformers import Gemma3ForCausalLM

        a = dict(spec.arch or {})
        tok = build_char_tokenizer()
        vocab = a.pop("vocab", len(tok))
        if vocab < len(tok):
            raise ValueError(f"--arch vocab={vocab} must be >= {len(tok)} (the tokenizer's)")
        kv, tied = a.pop("kv_heads", None), a.pop("tied", 1)
        cfg = tiny_config(vocab, **{k: v for k, v in a.items() if k in ("hidden", "layers", "heads",
                                                                        "intermediate", "max_len")})
        cfg.tie_word_embeddings = bool(tied)
        if kv:
            cfg.num_key_value_heads = kv
        torch.manual_seed(spec.seed)
        dtype = _DTYPES[spec.dtype]
        with torch.device(spec.device), _default_dtype(dtype):  # initialise on the device, in dtype
            net = Gemma3ForCausalLM(cfg)
        model = DLLM.wrap(net.to(dtype), tok, kind="tiny")
    if spec.activation_checkpointing:
        enable_activation_checkpointing(model.net)
    if spec.lora:
        apply_lora(model, spec.lora, max(spec.lora // 2, 1), 0.05)
    apply_precision(model, spec.resolved_precision)
    model.net.train()  # as the trainer (the tiny configs have no dropout)
    return model


def make_ref(policy: DLLM) -> DLLM:
    """A frozen copy of the policy, as the trainer builds the reference when β > 0."""
    net = copy.deepcopy(policy.net).requires_grad_(False)
    return DLLM(**{**policy.__dict__, "net": net})


def vocab_size(model: DLLM) -> int:
    return model.net.get_input_embeddings().num_embeddings


def count_params(model: DLLM) -> tuple[int, int]:
    ps = list(model.net.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


# ---- methods from the Hydra configs -------------------------------------------------------------
def compose_train(overrides: list[str]):
    """The resolved train config (``bgpo/conf/train.yaml``) with ``overrides``."""
    from hydra import compose, initialize_config_module

    from bgpo.config import register

    register()
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def method_partial(name: str, n_t: int, overrides: list[str] = ()):  # type: ignore[assignment]
    """``functools.partial(Method, cfg=...)`` of ``conf/method/<name>.yaml`` with ``mc = n_t``.

    ``overrides`` are Hydra overrides; ``NAME:KEY=VAL`` applies only to method NAME.
    """
    from bgpo.validate import build_method

    mine = []
    for o in overrides:
        head, sep, rest = o.partition(":")
        if sep and "=" not in head:
            if head == name:
                mine.append(rest)
        else:
            mine.append(o)
    return build_method(compose_train([f"method={name}", f"mc={n_t}", *mine]))


def needs_ref(partial) -> bool:
    return getattr(partial.keywords["cfg"], "beta", 0.0) > 0


def std_adv(partial) -> bool:
    return bool(partial.keywords["cfg"].std_adv)


# ---- a fixed rollout batch ----------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSpec:
    prompts: int = 2
    group: int = 8
    prompt_length: int = 16
    gen_length: int = 16
    seed: int = 0
    block_length: int = 8
    """the synthetic decoding trace (TraceRL's input): blocks left to right, a random order inside"""


def synthetic_batch(model: DLLM, spec: BatchSpec) -> tuple[Batch, torch.Tensor]:
    """Random prompts (repeated G times) and completions ending in a random run of EOS padding;
    rewards in {0, 1}, every group mixed (so every advantage is non-zero). Deterministic in seed."""
    g = torch.Generator().manual_seed(spec.seed)
    V, B, L = vocab_size(model), spec.prompts * spec.group, spec.gen_length
    specials = torch.tensor(sorted({model.mask_token_id, model.eos_token_id, model.pad_token_id}))
    lo = len(SPECIALS)  # the char tokenizer's special tokens come first

    def tokens(*shape: int) -> torch.Tensor:
        t = torch.randint(lo, V, shape, generator=g)
        return torch.where(torch.isin(t, specials), lo, t)  # never a special token

    prompt = tokens(spec.prompts, spec.prompt_length).repeat_interleave(spec.group, 0)  # [B, P]
    comp = tokens(B, L)  # [B, L]
    n_eos = torch.randint(0, L // 2 + 1, (B,), generator=g)  # EOS padding at the end of each row
    comp[torch.arange(L)[None, :] >= (L - n_eos)[:, None]] = model.eos_token_id
    rewards = (torch.rand(B, generator=g) < 0.5).double().view(spec.prompts, spec.group)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group mixed
    # a decoding trace as the block-wise sampler makes one, one token per step (own generator: the
    # batch above stays what it was before traces existed)
    gt = torch.Generator().manual_seed(spec.seed + 1)
    bl = min(spec.block_length, L)
    block = torch.arange(L) // bl  # [L]
    trace = torch.stack([block * bl + torch.cat([torch.randperm(min(bl, L - lo), generator=gt)
                                                 for lo in range(0, L, bl)]) for _ in range(B)])  # [B, L]
    batch = Batch.build(prompt.to(model.device), torch.ones_like(prompt).to(model.device),
                        comp.to(model.device), spec.group, trace.to(model.device))
    return batch, rewards.flatten()


# ---- rows ---------------------------------------------------------------------------------------
def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """The whole file, atomically (temp file + rename): one JSON object per line."""
    from bgpo.results import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a benchmark's ``.jsonl`` file (plotting-ready dicts)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def common_meta(spec: ModelSpec, cmd: str) -> dict[str, Any]:
    from bgpo.results import git_commit

    meta = {"model": spec.name, "device": spec.device, "dtype": spec.dtype, "lora": spec.lora,
            "precision": spec.resolved_precision, "activation_checkpointing": spec.activation_checkpointing,
            "arch": spec.arch, "commit": git_commit(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cmd": cmd}
    if spec.device.startswith("cuda"):
        meta["device_name"] = torch.cuda.get_device_name()
    return meta
