"""LLaDA (arXiv 2502.09992) as a native transformers model: ``LLaDAConfig`` / ``LLaDAModelLM``.

What it implements: the LLaDA-8B(-Base/-Instruct) network — a Llama-like pre-norm transformer
without a causal mask (``block_type: llama``): token embedding ``wte``; per block
``x + attn_out(Attn(attn_norm(x)))`` then ``x + ff_out(silu(ff_proj(h)) * up_proj(h))`` with
``h = ff_norm(x)``; RMSNorm (eps ``rms_norm_eps``), RoPE (θ ``rope_theta``, rotate-half, applied in
float32 when ``rope_full_precision``), no biases; final ``ln_f`` and an untied output layer
``ff_out``. Logits are NOT shifted: position i predicts token i. The config is the hub's own
``config.json`` (``model_type: llada``) with every key kept, and the parameters have the hub
checkpoint's names (``model.transformer.wte.weight``, ``model.transformer.blocks.N.q_proj.weight``,
..., ``model.transformer.ff_out.weight``), so ``from_pretrained`` reads the published safetensors
and ``save_pretrained`` writes the same format back.

Where it departs from the published ``modeling_llada.py`` (the hub's remote code):
- padding is masked: padded keys are never attended (``attention_mask``, as the Oct-2025 revision
  of the published file does; the Feb-2025 file ignored it and let padding leak into real tokens);
- it takes ``position_ids`` (the published code always uses ``0..T-1``): left-padded rows then
  start at 0. RoPE being relative, with padding masked, real tokens' logits agree with the
  published positions up to float rounding;
- the K/V cache is a transformers ``Cache`` holding keys after RoPE, with explicit positions (the
  published forward asserts no cache: "The kvcache is not suppotred for MDM");
- activation checkpointing is transformers' ``gradient_checkpointing_enable()`` on the blocks,
  not the published ``set_activation_checkpointing(strategy)``;
- only what the released checkpoints use is implemented (see ``SUPPORTED``): another setting
  (ALiBi, biases, weight tying, QK norm, block groups...) is refused with the key's name rather
  than computed wrongly; load such a checkpoint with ``model.remote_code=true``;
- a freshly built model (``from_config``) is initialised with transformers' default normal
  (std ``init_std``), not LLaDA's ``mitchell`` init: it is only meant for shape/memory runs;
- the RMSNorm statistics and RoPE are computed in float32 or wider (a float64 model stays float64).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# relative, and nothing else of the suite: an export ships this file beside layers.py (bgpo.export)
from .layers import (
    RMSNorm,
    apply_rope,
    attention,
    keep_positions,
    output,
    prepare_inputs,
    rope,
    split_heads,
    swiglu,
)

SUPPORTED: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
    "rope": (True,), "alibi": (False,), "weight_tying": (False,), "include_bias": (False,),
    "include_qkv_bias": (False,), "attention_layer_norm": (False,), "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None), "scale_logits": (False,), "input_emb_norm": (False,),
    "block_group_size": (1,), "multi_query_attention": (None, False), "residual_dropout": (0.0,),
    "embedding_dropout": (0.0,),
}
"""The values LLaDA-8B-Base/-Instruct's config.json holds for the keys that change the network."""


class LLaDAConfig(PretrainedConfig):
    """LLaDA's hub ``config.json``; defaults are LLaDA-8B-Instruct's (docs/methods.md §1). Keys not named
    here (``init_fn``, ``precision``, ``auto_map``...) are kept as they are and saved back."""

    model_type = "llada"

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None,
                 n_layers: int = 32, mlp_hidden_size: int | None = 12288, mlp_ratio: int = 4,
                 vocab_size: int = 126464, embedding_size: int | None = 126464,
                 max_sequence_length: int = 4096, rope_theta: float = 500000.0,
                 rope_full_precision: bool = True, rms_norm_eps: float = 1e-5,
                 attention_dropout: float = 0.0, init_std: float = 0.02, mask_token_id: int = 126336,
                 use_cache: bool = False, **kwargs: Any) -> None:
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_hidden_size, self.mlp_ratio = mlp_hidden_size, mlp_ratio
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.max_sequence_length, self.rope_theta = max_sequence_length, rope_theta
        self.rope_full_precision, self.rms_norm_eps = rope_full_precision, rms_norm_eps
        self.attention_dropout, self.init_std = attention_dropout, init_std
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        kwargs.setdefault("pad_token_id", 126081)
        kwargs.setdefault("eos_token_id", 126081)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def num_hidden_layers(self) -> int:  # the names transformers' utilities look for
        return self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    def check_supported(self) -> None:
        """Refuse, naming the key, a setting the native model does not implement."""
        hub = self.to_dict()  # the keys as config.json spells them
        for key, allowed in SUPPORTED.items():
            value = hub.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(f"LLaDA config {key}={value!r} is not implemented by bgpo's native LLaDA "
                                 f"(the released checkpoints use {allowed[0]!r}); load it with "
                                 "model.remote_code=true")


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One block: ``x + Attn(attn_norm(x))``, then ``x + SwiGLU(ff_norm(x))``."""

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        C, kv = config.d_model, config.kv_heads * config.head_dim
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        self.dropout = config.attention_dropout
        self.rope_full_precision = config.rope_full_precision
        self.attn_norm = RMSNorm(C, config.rms_norm_eps)
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, kv, bias=False)
        self.v_proj = nn.Linear(C, kv, bias=False)
        self.attn_out = nn.Linear(C, C, bias=False)
        self.ff_norm = RMSNorm(C, config.rms_norm_eps)
        self.ff_proj = nn.Linear(C, config.mlp_size, bias=False)  # the gate of SwiGLU
        self.up_proj = nn.Linear(C, config.mlp_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_size, C, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None = None,
                cache: Cache | None = None) -> Tensor:
        h = self.attn_norm(x)  # [B, T, C]
        q = split_heads(self.q_proj(h), self.head_dim)  # [B, H, T, D]
        k = split_heads(self.k_proj(h), self.head_dim)  # [B, Hkv, T, D]
        v = split_heads(self.v_proj(h), self.head_dim)  # [B, Hkv, T, D]
        rope_dtype = q.dtype if not self.rope_full_precision else cos.dtype  # float32 (or wider)
        q, k = apply_rope(q, cos, sin, rope_dtype), apply_rope(k, cos, sin, rope_dtype)
        dropout = self.dropout if self.training else 0.0
        x = x + self.attn_out(attention(q, k, v, key_mask, cache, self.layer_idx, dropout))  # [B, T, C]
        h = self.ff_norm(x)
        return x + swiglu(h, self.ff_proj, self.up_proj, self.ff_out)  # [B, T, C]


class LLaDAModel(nn.Module):
    """The parameters under ``model.``: ``transformer.{wte, blocks, ln_f, ff_out}`` (hub names)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.d_model),
            blocks=nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, vocab, bias=False),
        ))

    def forward(self, input_ids: Tensor, key_mask: Tensor | None, position_ids: Tensor,
                cache: Cache | None, logits_to_keep: int | Tensor = 0) -> Tensor:
        t, cfg = self.transformer, self.config
        x = t.wte(input_ids)  # [B, T, C]
        cos, sin = rope(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)  # [B, 1, T, D]
        for block in t.blocks:
            x = block(x, cos, sin, key_mask, cache=cache)  # [B, T, C]
        return t.ff_out(t.ln_f(keep_positions(x, logits_to_keep)))  # [B, T', V]


class LLaDAModelLM(PreTrainedModel):
    """LLaDA with the hub's class name (``architectures: ["LLaDAModelLM"]``) and parameter names."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig) -> None:
        config.check_supported()
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                past_key_values: Cache | None = None, **unused: Any) -> CausalLMOutputWithPast:
        """Logits ``[B, T, V]`` (position i predicts token i). ``attention_mask``: ``[B, S]`` 1 on real
        tokens, over the cached and the new positions in cache order; ``position_ids`` ``[B, T]``;
        ``cache`` (or its older name ``past_key_values``): a transformers ``Cache`` to read and
        extend; ``use_cache``: start one when none is given; ``logits_to_keep``: see
        ``layers.keep_positions``. Other keyword arguments (``return_dict``...) are ignored."""
        inp = prepare_inputs(input_ids, attention_mask, position_ids,
                             cache if cache is not None else past_key_values, use_cache)
        logits = self.model(input_ids, inp.key_mask, inp.position_ids, inp.cache, logits_to_keep)
        return output(logits, inp.cache)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value
