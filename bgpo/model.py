"""The dLLM adapter: one small interface over the tiny model, LLaDA and Dream (docs/methods.md §1).

Everything else in the suite sees a ``DLLM``: ``logits(input_ids, attention_mask) -> [B, T, V]``
aligned so that position i predicts token i, the ids of mask / EOS / pad, and the tokenizer with
its prompt handling (left padding, optional chat template).

Backends (``kind``):
- ``tiny``: the embedded default — a transformers-native bidirectional Gemma3
  (``use_bidirectional_attention=True``) over a character tokenizer built with ``tokenizers``;
  saved with ``save_pretrained`` (safetensors) and loaded back through ``AutoModelForCausalLM``.
- ``llada``: the suite's native LLaDA (``bgpo.models.llada``) reading the hub checkpoint as it is;
  mask id from its config (126336), no shift, Llama-3 style chat template from its tokenizer.
- ``dream``: the native Dream (``bgpo.models.dream``); its logits at i-1 predict token i, so they
  are shifted right by one.
``remote_code=True`` (``model.remote_code``) loads LLaDA / Dream with the checkpoint's own
modeling code instead (``trust_remote_code``; written for transformers 4.46, it does not load
under transformers 5, and it has no KV cache for ``sampler.mode=cached``).

Precision (``model.precision``, issue 12; BGPO §4 trains in bf16 with FSDP2): ``fp32`` computes in
the storage dtype ``model.dtype`` (float32; float64 in the exactness tests); ``bf16-mixed`` keeps
float32 weights (so AdamW's master weights and moments are float32) and runs every forward pass in
bfloat16 — ``torch.autocast`` here (``DLLM.autocast``), FSDP2's ``MixedPrecisionPolicy`` under
``parallel=fsdp`` (``bgpo.parallel``); ``bf16-pure`` stores everything in bfloat16 (at lr 5e-7
most AdamW updates round back to the same bf16 value). Logits are upcast to float32 before any
log-softmax (``bgpo.elbo``) and the sampler's Gumbel noise is float64 in every mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bgpo.models import NATIVE  # also registers LLaDA and Dream with transformers' Auto classes

KINDS = ("tiny", "llada", "dream")
MODEL_TYPES = {"tiny": ("gemma3_text",), **{k: (c.config_class.model_type,) for k, c in NATIVE.items()}}
"""``model_type`` a checkpoint's config.json must have for each kind"""
LLADA_MASK_ID = 126336
PRECISIONS = {"fp32": ("float32", "float64"), "bf16-mixed": ("float32",), "bf16-pure": ("bfloat16",)}
"""``model.precision`` -> the storage dtypes (``model.dtype``) it allows"""

# Character tokenizer of the tiny model: specials first, then printable ASCII.
PAD, EOS, MASK, UNK = "<|pad|>", "<|eos|>", "<|mask|>", "<|unk|>"
SPECIALS = (PAD, EOS, MASK, UNK)


def cache_dir() -> Path:
    """Where base models and other caches live: ``$BGPO_CACHE`` or ``~/.cache/bgpo``."""
    return Path(os.environ.get("BGPO_CACHE", Path.home() / ".cache" / "bgpo"))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` (one token per printable ASCII char)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK,
        padding_side="left",
    )


def tiny_config(vocab_size: int, hidden: int = 192, layers: int = 6, heads: int = 4,
                intermediate: int = 512, max_len: int = 256):
    """The embedded tiny dLLM: a bidirectional Gemma3 (Llama-like, as LLaDA), ~2.7M parameters."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads,
        max_position_embeddings=max_len, use_bidirectional_attention=True,
        layer_types=["full_attention"] * layers, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **arch: int) -> DLLM:
    """A freshly initialised tiny dLLM (deterministic in ``seed``)."""
    from transformers import Gemma3ForCausalLM

    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    net = Gemma3ForCausalLM(tiny_config(len(tokenizer), **arch)).to(dtype)
    return DLLM.wrap(net, tokenizer, kind="tiny")


@dataclass
class DLLM:
    """A masked diffusion LM behind one interface (docs/methods.md §1)."""

    net: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    use_chat_template: bool = False
    remote_code: bool = False
    """the network is the checkpoint's published modeling code (not a native class)"""
    autocast_dtype: torch.dtype | None = None
    """bf16-mixed on one process / ddp: every forward pass runs under ``torch.autocast`` to this dtype"""

    @classmethod
    def wrap(cls, net: nn.Module, tokenizer: PreTrainedTokenizerBase, kind: str,
             mask_token_id: int | None = None, use_chat_template: bool = False,
             remote_code: bool = False) -> DLLM:
        if kind not in KINDS:
            raise ValueError(f"model.kind={kind!r} is not one of {list(KINDS)}")
        if mask_token_id is None:
            mask_token_id = LLADA_MASK_ID if kind == "llada" else tokenizer.mask_token_id
        if mask_token_id is None:
            raise ValueError(f"model.mask_token_id: the {kind} tokenizer defines no mask token; set it")
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(net, tokenizer, kind, int(mask_token_id), int(eos), int(pad), use_chat_template,
                   remote_code)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def shift(self) -> bool:
        """Dream predicts token i at position i-1 (autoregressive heritage)."""
        return self.kind == "dream"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' precision context: ``torch.autocast`` for bf16-mixed, else nothing
        (the network computes in its parameters' dtype). Whoever calls ``net`` directly (the cached
        sampler) enters it too."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` where position i predicts token i, whatever the backend."""
        kwargs: dict[str, Tensor] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self.remote_code and self.kind == "dream":  # its forward hands the mask to SDPA as is
                B, T = attention_mask.shape
                kwargs["attention_mask"] = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
            if not (self.remote_code and self.kind == "llada"):  # LLaDA's remote code takes none
                # Left padding: real tokens start at position 0 whatever the pad count.
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.autocast():
            out = self.net(input_ids=input_ids, **kwargs).logits  # [B, T, V]
        if self.shift:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out

    # ---- text <-> ids -------------------------------------------------------------------
    def format_prompt(self, text: str) -> str:
        if not self.use_chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    def encode_prompts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids ``[B, P]`` and attention mask ``[B, P]`` on the model's device."""
        enc = self.tokenizer(
            [self.format_prompt(t) for t in texts], add_special_tokens=False, padding=True,
            padding_side="left", return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_completions(self, texts: list[str], gen_length: int) -> Tensor:
        """Target completions ``[B, gen_length]``: the text, then EOS up to the window's end."""
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) >= gen_length:
                raise ValueError(f"task.gen_length={gen_length} is too short for a target of "
                                 f"{len(ids)} tokens + EOS: {t!r}")
            rows.append(ids + [self.eos_token_id] * (gen_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def decode_completions(self, completion_ids: Tensor) -> list[str]:
        """Completion text up to the first EOS (EOS, pad and mask tokens dropped)."""
        texts = []
        for row in completion_ids.tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            row = [t for t in row if t not in (self.mask_token_id, self.pad_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def save(self, path: str | Path) -> None:
        self.net.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64, "auto": "auto"}


def load_dllm(kind: str, path: str | Path, dtype: str = "float32", device: str = "cpu",
              mask_token_id: int | None = None, use_chat_template: bool = False,
              remote_code: bool = False, revision: str | None = None,
              trust_remote_code: bool | None = None, empty: bool = False) -> DLLM:
    """Load a dLLM of ``kind`` from a local folder or hub name (no download happens for ``tiny``).

    ``llada`` / ``dream`` load into the suite's native classes (``bgpo.models``) unless
    ``remote_code`` asks for the checkpoint's own modeling code. ``revision`` (hub branch, tag or
    commit) reaches every ``from_pretrained``; ``trust_remote_code`` decides whether a tokenizer
    shipped as code may run (None: run it with a warning; the remote-code model path implies True).
    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a config of another
    ``model_type`` or a checkpoint whose parameter names do not match the class, each in one
    sentence naming the folder.

    ``empty``: the network is built with its parameters on the meta device and no weights read
    (buffers such as RoPE tables are real): FSDP shards it, then each rank reads only its own
    slices of the checkpoint (``bgpo.parallel.Dist.materialize``). Native and tiny models only."""
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {list(KINDS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {list(_DTYPES)}")
    hub: dict = {"revision": revision} if revision else {}
    config_file = _config_file(path, revision)
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_TYPES[kind]:
        other = [k for k, types in MODEL_TYPES.items() if model_type in types]
        hint = f" (it is a model.kind={other[0]} checkpoint)" if other else ""
        raise ValueError(f"{config_file} has model_type={model_type!r} but model.kind={kind!r} needs "
                         f"model_type {' or '.join(map(repr, MODEL_TYPES[kind]))}{hint}")
    # on an accelerator the weights go straight to it, one checkpoint shard at a time (the model is
    # built on the meta device): the host never holds the whole model (8 ranks × 32 GB at 8B in fp32)
    place = {"device_map": {"": device}} if torch.device(device).type != "cpu" else {}
    if empty and remote_code:
        raise ValueError("model.remote_code=true cannot be built without its weights (FSDP's sharded load): "
                         "use the native class (model.remote_code=false)")
    if empty:
        net = _empty(kind, path, dtype, hub)
        if mask_token_id is None and kind != "tiny":
            mask_token_id = getattr(net.config, "mask_token_id", None)
    elif kind == "tiny":
        net = _from_pretrained(AutoModelForCausalLM, path, dtype, **hub, **place)
    elif remote_code:  # the published modeling code (transformers 4.46-era)
        net = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=_DTYPES[dtype], **hub, **place)
    else:
        cls = NATIVE[kind]
        config = cls.config_class.from_pretrained(path, **hub)
        config.check_supported()  # a setting the native class does not implement: say which
        net = _from_pretrained(cls, path, dtype, config=config, **hub, **place)
        if mask_token_id is None:
            mask_token_id = getattr(config, "mask_token_id", None)
    tokenizer = _load_tokenizer(kind, path, remote_code or bool(trust_remote_code),
                                trust_remote_code is False, hub)
    return DLLM.wrap(net if empty else net.to(device), tokenizer, kind, mask_token_id, use_chat_template,
                     remote_code)


def _empty(kind: str, path: str | Path, dtype: str, hub: dict) -> nn.Module:
    """The network of ``kind`` at the folder's config, parameters on the meta device (no memory),
    buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "tiny":
        config = AutoConfig.from_pretrained(path, **hub)
    else:
        config = NATIVE[kind].config_class.from_pretrained(path, **hub)
        config.check_supported()
    want = _DTYPES[dtype] if dtype != "auto" else getattr(config, "dtype", None) or torch.float32
    want = getattr(torch, want) if isinstance(want, str) else want
    old = torch.get_default_dtype()
    torch.set_default_dtype(want)
    try:
        with init_empty_weights(include_buffers=False):
            # from_config follows the config's dtype, not the default: told, as from_pretrained is
            net = AutoModelForCausalLM.from_config(config, dtype=want) if kind == "tiny" \
                else NATIVE[kind](config)
        net.tie_weights()  # a tied LM head is the embedding (from_pretrained ties; the bare class not)
        return net
    finally:
        torch.set_default_dtype(old)


def _config_file(path: str | Path, revision: str | None = None) -> Path:
    """``config.json`` of a local model folder, or of a hub model (from the hub cache or a download)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.path={str(path)!r} has no config.json: not a saved model folder")
        return folder / "config.json"
    name = str(path)
    if folder.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model.path={name!r}: no such model folder")
    from transformers.utils import cached_file

    try:  # a hub name such as GSAI-ML/LLaDA-8B-Instruct
        return Path(cached_file(name, "config.json", revision=revision))
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"model.path={name!r} is neither a model folder nor a model the Hugging Face "
                                f"hub (or its local cache) has: {reason}") from None


def _from_pretrained(cls: type, path: str | Path, dtype: str, **kwargs: object) -> nn.Module:
    """``cls.from_pretrained``, refusing a checkpoint whose parameter names or shapes do not match
    (transformers would initialise the missing ones at random and carry on)."""
    net, info = cls.from_pretrained(path, dtype=_DTYPES[dtype], output_loading_info=True,
                                    ignore_mismatched_sizes=True, **kwargs)  # reported below
    problems = {"missing": sorted(info.get("missing_keys", [])),
                "unexpected": sorted(info.get("unexpected_keys", [])),
                "of another shape": sorted(str(m[0]) for m in info.get("mismatched_keys", []))}
    if any(problems.values()):
        parts = [f"{label}: {', '.join(names[:3])}" + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
                 for label, names in problems.items() if names]
        raise ValueError(f"{path}: the checkpoint's parameters do not match {type(net).__name__} "
                         f"({'; '.join(parts)}); is it saved in the hub format of its model_type?")
    return net


def _load_tokenizer(kind: str, path: str | Path, trusted: bool, refused: bool,
                    hub: dict) -> PreTrainedTokenizerBase:
    """The folder's tokenizer. A tokenizer that ships as code (Dream's ``tokenization_dream.py``)
    is run even for a native model (only the modeling code is replaced by the suite's), with a
    warning — unless ``trust_remote_code=False`` (``refused``) says not to."""
    from transformers import AutoTokenizer

    if kind == "tiny":
        return AutoTokenizer.from_pretrained(path, **hub)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trusted, **hub)
    except ValueError as e:
        if trusted or "trust_remote_code" not in str(e):
            raise
        if refused:
            raise ValueError(f"{path}: the tokenizer ships as custom code and "
                             "trust_remote_code=False") from None
    warnings.warn(f"{path}: the tokenizer ships as custom code (trust_remote_code); running it "
                  "(the model itself is the suite's native class)", stacklevel=3)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=True, **hub)


def check_precision(precision: str, dtype: str) -> None:
    """``model.precision`` and ``model.dtype`` agree (one sentence naming both keys otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r} is not one of {list(PRECISIONS)}")
    if dtype != "auto" and dtype not in PRECISIONS[precision]:  # auto: checked once loaded
        allowed = " or ".join(PRECISIONS[precision])
        raise ValueError(f"model.precision={precision} stores the weights in {allowed}: "
                         f"set model.dtype={PRECISIONS[precision][0]} (it is {dtype})")


def apply_precision(model: DLLM, precision: str, sharded: bool = False) -> DLLM:
    """Set the forward passes' precision of ``model.precision``: bf16-mixed autocasts to bfloat16
    unless the network is FSDP-sharded (``sharded``: its ``MixedPrecisionPolicy`` casts instead)."""
    check_precision(precision, str(next(model.net.parameters()).dtype).removeprefix("torch."))
    model.autocast_dtype = torch.bfloat16 if precision == "bf16-mixed" and not sharded else None
    return model


def enable_activation_checkpointing(net: nn.Module) -> None:
    """``model.activation_checkpointing``: every transformer block's activations are recomputed in
    the backward pass instead of stored (transformers' activation checkpointing, non-reentrant
    ``torch.utils.checkpoint``: the tiny Gemma3 and the native LLaDA / Dream; with LoRA call it
    before ``apply_lora``; FSDP2 shards the same blocks)."""
    if not getattr(net, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.activation_checkpointing: {type(net).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(model: DLLM, r: int, alpha: int, dropout: float,
               target_modules: list[str] | str = "all-linear") -> DLLM:
    """Wrap the network in a peft LoRA adapter (d1: r=128, alpha=64, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    model.net = get_peft_model(model.net, cfg)
    return model
