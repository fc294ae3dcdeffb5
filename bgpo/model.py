"""The dLLM adapter: one small interface over the tiny model, LLaDA and Dream (SPEC §1).

Everything else in the suite sees a ``DLLM``: ``logits(input_ids, attention_mask) -> [B, T, V]``
aligned so that position i predicts token i, the ids of mask / EOS / pad, and the tokenizer with
its prompt handling (left padding, optional chat template).

Backends (``kind``):
- ``tiny``: the embedded default — a transformers-native bidirectional Gemma3
  (``use_bidirectional_attention=True``) over a character tokenizer built with ``tokenizers``;
  saved with ``save_pretrained`` (safetensors) and loaded back through ``AutoModelForCausalLM``.
- ``llada``: ``AutoModel.from_pretrained(..., trust_remote_code=True)``; mask id 126336, no shift,
  Llama-3 style chat template from its tokenizer.
- ``dream``: the same loading; its logits at i-1 predict token i, so they are shifted right by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

KINDS = ("tiny", "llada", "dream")
LLADA_MASK_ID = 126336

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
    """A masked diffusion LM behind one interface (SPEC §1)."""

    net: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    use_chat_template: bool = False

    @classmethod
    def wrap(cls, net: nn.Module, tokenizer: PreTrainedTokenizerBase, kind: str,
             mask_token_id: int | None = None, use_chat_template: bool = False) -> DLLM:
        if kind not in KINDS:
            raise ValueError(f"model.kind={kind!r} is not one of {list(KINDS)}")
        if mask_token_id is None:
            mask_token_id = LLADA_MASK_ID if kind == "llada" else tokenizer.mask_token_id
        if mask_token_id is None:
            raise ValueError(f"model.mask_token_id: the {kind} tokenizer defines no mask token; set it")
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(net, tokenizer, kind, int(mask_token_id), int(eos), int(pad), use_chat_template)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def shift(self) -> bool:
        """Dream predicts token i at position i-1 (autoregressive heritage)."""
        return self.kind == "dream"

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` where position i predicts token i, whatever the backend."""
        kwargs: dict[str, Tensor] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self.kind != "llada":  # LLaDA's remote code takes no position ids
                # Left padding: real tokens start at position 0 whatever the pad count.
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
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
              revision: str | None = None, trust_remote_code: bool | None = None) -> DLLM:
    """Load a dLLM of ``kind`` from a local folder or hub name (no download happens for ``tiny``).
    ``revision`` (hub branch, tag or commit) and ``trust_remote_code`` go to ``from_pretrained``
    of the model and the tokenizer; ``trust_remote_code=None`` keeps each kind's default (LLaDA
    and Dream ship their modelling code on the hub: True; tiny: transformers' default)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {list(KINDS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {list(_DTYPES)}")
    hub: dict = {"revision": revision} if revision else {}
    if trust_remote_code is not None:
        hub["trust_remote_code"] = bool(trust_remote_code)
    if kind == "tiny":
        net = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], **hub)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    else:  # LLaDA and Dream ship their modeling code on the hub
        hub.setdefault("trust_remote_code", True)
        net = AutoModel.from_pretrained(path, dtype=_DTYPES[dtype], **hub)
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    return DLLM.wrap(net.to(device), tokenizer, kind, mask_token_id, use_chat_template)


def apply_lora(model: DLLM, r: int, alpha: int, dropout: float,
               target_modules: list[str] | str = "all-linear") -> DLLM:
    """Wrap the network in a peft LoRA adapter (d1: r=128, alpha=64, dropout 0.05)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    model.net = get_peft_model(model.net, cfg)
    return model
