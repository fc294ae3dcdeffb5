"""Dream (Dream-v0-7B: Qwen2-7B's architecture and initial weights, attention made bidirectional)
as a native transformers model: ``DreamConfig`` / ``DreamModel``.

What it implements: Qwen2's network without a causal mask — ``embed_tokens``; per layer
``x + o_proj(Attn(input_layernorm(x)))`` with biased ``q/k/v_proj`` and grouped-query heads
(``num_key_value_heads``), then ``x + down_proj(silu(gate_proj(h)) * up_proj(h))`` with
``h = post_attention_layernorm(x)``; RMSNorm (eps ``rms_norm_eps``), RoPE (θ ``rope_theta``,
rotate-half, applied in the model's dtype as Qwen2 does), final ``norm`` and an untied
``lm_head``. Dream's logits are shifted: the output at position i-1 predicts token i
(``bgpo.model.DLLM.logits`` shifts them back). The config is the hub's ``config.json``
(``model_type: Dream``, capital D as published) with every key kept; parameter names are Qwen2's
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.{weight,bias}``, ...,
``lm_head.weight``), so the published safetensors load and save unchanged.

Where it departs from the published ``modeling_dream.py`` (the hub's remote code):
- the attention mask is the tokenizer's 2-D ``[B, T]`` 0/1 mask, turned into a key mask here
  (the published forward hands the mask to SDPA as it is: a 2-D int mask raises; Dream's own
  ``generate()`` builds a 4-D bool mask, which is also accepted);
- RoPE's ``cos/sin`` are computed from the position ids at every forward pass: the published
  file keeps them in a non-persistent buffer that transformers 5 materialises uninitialised
  (silently wrong logits);
- the K/V cache is a transformers ``Cache`` used by ``bgpo/sampler_cached.py``; no sliding
  window, no RoPE scaling, no flash-attention path (``SUPPORTED``: other settings are refused with
  the key's name; load them with ``model.remote_code=true``);
- activation checkpointing is transformers' ``gradient_checkpointing_enable()`` on the layers;
- the RMSNorm statistics and RoPE frequencies are computed in float32 or wider.
Kept as published: ``embed_tokens`` has ``padding_idx = pad_token_id`` (so, in training, the
pad = EOS embedding row gets no gradient), and the default init is normal(0, initializer_range).
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
    "hidden_act": ("silu",), "rope_scaling": (None,), "use_sliding_window": (False,),
    "use_mrope": (False,), "tie_word_embeddings": (False,),
}
"""The values Dream-v0-7B's config.json holds for the keys that would change the network."""


class DreamConfig(PretrainedConfig):
    """Dream's hub ``config.json``; defaults are Dream-v0-Instruct-7B's (docs/methods.md §1). Keys not named
    here (``max_window_layers``, ``sliding_window``, ``auto_map``...) are kept and saved back."""

    model_type = "Dream"

    def __init__(self, vocab_size: int = 152064, hidden_size: int = 3584, intermediate_size: int = 18944,
                 num_hidden_layers: int = 28, num_attention_heads: int = 28, num_key_value_heads: int = 4,
                 max_position_embeddings: int = 131072, rope_theta: float = 1000000.0,
                 rms_norm_eps: float = 1e-6, attention_dropout: float = 0.0,
                 initializer_range: float = 0.02, mask_token_id: int = 151666, use_cache: bool = True,
                 tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                 **kwargs: Any) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.rms_norm_eps, self.attention_dropout = rms_norm_eps, attention_dropout
        self.initializer_range, self.mask_token_id = initializer_range, mask_token_id
        self.use_cache = use_cache
        # kept aside: transformers 5 would rewrite a ``rope_scaling`` attribute into ``rope_parameters``
        self.hub_rope_scaling = rope_scaling
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(key, 151643)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rope_scaling"] = out.pop("hub_rope_scaling", None)  # the hub's key
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_supported(self) -> None:
        """Refuse, naming the key, a setting the native model does not implement."""
        hub = self.to_dict()  # the keys as config.json spells them
        for key, allowed in SUPPORTED.items():
            value = hub.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(f"Dream config {key}={value!r} is not implemented by bgpo's native Dream "
                                 f"(Dream-v0-7B uses {allowed[0]!r}); load it with model.remote_code=true")


class DreamAttention(nn.Module):
    """Qwen2's attention (biased q/k/v, grouped-query heads), without a causal mask."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        C, D = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim, self.dropout = layer_idx, D, config.attention_dropout
        self.q_proj = nn.Linear(C, config.num_attention_heads * D, bias=True)
        self.k_proj = nn.Linear(C, config.num_key_value_heads * D, bias=True)
        self.v_proj = nn.Linear(C, config.num_key_value_heads * D, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * D, C, bias=False)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                cache: Cache | None) -> Tensor:
        q = split_heads(self.q_proj(h), self.head_dim)  # [B, H, T, D]
        k = split_heads(self.k_proj(h), self.head_dim)  # [B, Hkv, T, D]
        v = split_heads(self.v_proj(h), self.head_dim)  # [B, Hkv, T, D]
        q, k = apply_rope(q, cos, sin, q.dtype), apply_rope(k, cos, sin, k.dtype)  # in the model's dtype
        dropout = self.dropout if self.training else 0.0
        return self.o_proj(attention(q, k, v, key_mask, cache, self.layer_idx, dropout))  # [B, T, C]


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return swiglu(h, self.gate_proj, self.up_proj, self.down_proj)  # [B, T, C]


class DreamDecoderLayer(GradientCheckpointingLayer):
    """One layer: ``x + Attn(input_layernorm(x))``, then ``x + MLP(post_attention_layernorm(x))``."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None = None,
                cache: Cache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache)  # [B, T, C]
        return x + self.mlp(self.post_attention_layernorm(x))  # [B, T, C]


class DreamBaseModel(nn.Module):
    """The parameters under ``model.``: ``embed_tokens``, ``layers``, ``norm`` (Qwen2 names)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, key_mask: Tensor | None, position_ids: Tensor,
                cache: Cache | None) -> Tensor:
        x = self.embed_tokens(input_ids)  # [B, T, C]
        cos, sin = rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)  # [B, 1, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask, cache=cache)  # [B, T, C]
        return self.norm(x)  # [B, T, C]


class DreamModel(PreTrainedModel):
    """Dream with the hub's class name (``architectures: ["DreamModel"]``) and parameter names."""

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: DreamConfig) -> None:
        config.check_supported()
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                past_key_values: Cache | None = None, **unused: Any) -> CausalLMOutputWithPast:
        """Raw (unshifted) logits ``[B, T, V]``: position i-1 predicts token i. Arguments as
        ``LLaDAModelLM.forward`` (2-D padding mask in cache order, position ids, cache,
        ``logits_to_keep``); other keyword arguments are ignored."""
        inp = prepare_inputs(input_ids, attention_mask, position_ids,
                             cache if cache is not None else past_key_values, use_cache)
        h = self.model(input_ids, inp.key_mask, inp.position_ids, inp.cache)  # [B, T, C]
        return output(self.lm_head(keep_positions(h, logits_to_keep)), inp.cache)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value
