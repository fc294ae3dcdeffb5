"""Miniatures of the full-scale models (issue 12): LLaDA-8B's and Dream-7B's architecture at the
golden fixtures' shapes, random weights, saved in the hub format by the native classes.

    build_miniature("llada") -> ~/.cache/bgpo/miniature-llada   (built once, then reused)

What is kept from the real model: the native class and its hub config keys, bidirectional
attention, RoPE θ, the norms, GQA for Dream, untied output layers, the Dream logit shift, the
special tokens (mask, EOS = pad, BOS, the chat-template markers) and a chat template of the same
form (Llama-3-style headers for LLaDA, ``<|im_start|>`` turns for Dream). What is not: the width
(d_model 64, MLP 128, 4 heads, 2 layers: the shapes of the golden fixtures that
``tests/test_native_models.py`` reads) and the vocabulary.

Ids are MAPPED, not kept: a 126464-token output layer costs ~100× the rest of a 64-wide model and
made one dry-run job take minutes on a CPU. The miniature's vocabulary has ``MINI_VOCAB`` = 1024
ids and every special token keeps its distance from the top of the real vocabulary:
``mini_id = real_id − real_vocab + 1024`` (``mini_id``). LLaDA: mask 126336 → 896, EOS/pad 126081
→ 641, BOS 126080 → 640; Dream: mask 151666 → 626, EOS/pad/BOS 151643 → 603. The text is the
suite's character set (printable ASCII and newline at ids 0–95, unknown characters → 96), so a
config that names the real mask id (``model.mask_token_id: 126336`` in
``conf/model/llada_8b_instruct.yaml``) needs ``model.mask_token_id=mini_id(...)`` with a miniature;
everything else (EOS and pad from the tokenizer, the mask id from config.json) is read from the
folder as it is for the real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from bgpo.model import cache_dir
from bgpo.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

MINI_VOCAB = 1024
REAL_VOCAB = {"llada": 126464, "dream": 152064}
SPECIALS = {  # the real tokenizers' special tokens and ids (their hub tokenizer configs)
    "llada": {"bos": ("<|startoftext|>", 126080), "eos": ("<|endoftext|>", 126081),
              "mask": ("<|mdm_mask|>", 126336), "header_start": ("<|start_header_id|>", 126346),
              "header_end": ("<|end_header_id|>", 126347), "eot": ("<|eot_id|>", 126348)},
    "dream": {"eos": ("<|endoftext|>", 151643), "im_start": ("<|im_start|>", 151644),
              "im_end": ("<|im_end|>", 151645), "mask": ("<|mask|>", 151666)},
}
CHAT_TEMPLATES = {
    "llada": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "dream": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
SHAPES = {  # the golden fixtures' shapes (their README.txt)
    "llada": dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128),
    "dream": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_window_layers=2),
}
UNK = "<|unk|>"


def mini_id(kind: str, real_id: int) -> int:
    """The miniature's id of a real special-token id (see the module docstring)."""
    if kind not in REAL_VOCAB:
        raise ValueError(f"model.kind={kind!r} has no miniature; allowed: {sorted(REAL_VOCAB)}")
    return real_id - REAL_VOCAB[kind] + MINI_VOCAB


def mini_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Characters at ids 0–95, unknown at 96, the real special tokens at their mapped ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = {role: (text, mini_id(kind, real)) for role, (text, real) in SPECIALS[kind].items()}
    vocab = {**{c: i for i, c in enumerate(chars)}, UNK: len(chars), **dict(specials.values())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines one by one
    tok.decoder = decoders.Fuse()
    eos = specials["eos"][0]
    others = [text for role, (text, _) in specials.items() if role not in ("eos", "mask", "bos")]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, unk_token=UNK,
                                  mask_token=specials["mask"][0], bos_token=specials.get("bos", (eos,))[0],
                                  additional_special_tokens=others, padding_side="left")
    out.chat_template = CHAT_TEMPLATES[kind]
    return out


def mini_config(kind: str) -> LLaDAConfig | DreamConfig:
    ids = {role: mini_id(kind, real) for role, (_, real) in SPECIALS[kind].items()}
    if kind == "llada":
        return LLaDAConfig(**SHAPES["llada"], vocab_size=MINI_VOCAB, embedding_size=MINI_VOCAB,
                           mask_token_id=ids["mask"], pad_token_id=ids["eos"], eos_token_id=ids["eos"],
                           bos_token_id=ids["bos"])
    return DreamConfig(**SHAPES["dream"], vocab_size=MINI_VOCAB, mask_token_id=ids["mask"],
                       pad_token_id=ids["eos"], eos_token_id=ids["eos"], bos_token_id=ids["eos"])


def default_path(kind: str) -> Path:
    """``$BGPO_CACHE/miniature-<kind>-<hash of what it is built from>``."""
    spec = json.dumps([SHAPES[kind], SPECIALS[kind], MINI_VOCAB, CHAT_TEMPLATES[kind]], sort_keys=True)
    return cache_dir() / f"miniature-{kind}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def build_miniature(kind: str, out: str | Path | None = None, seed: int = 0) -> Path:
    """The miniature of ``kind`` (llada | dream) as a model folder, built if missing (atomically:
    a half-written folder is never used)."""
    path = Path(out) if out is not None else default_path(kind)
    if (path / "config.json").is_file():
        return path
    cls = {"llada": LLaDAModelLM, "dream": DreamModel}[kind]
    torch.manual_seed(seed)
    net = cls(mini_config(kind))
    tmp = path.with_name(f"{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    mini_tokenizer(kind).save_pretrained(tmp)
    (tmp / "MINIATURE.md").write_text(f"A random miniature of the {kind} architecture built by "
                                      f"bgpo.miniature (seed {seed}); special-token ids mapped by mini_id. "
                                      "Not a trained model.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
