"""THE Monte Carlo ELBO sampler shared by every method (SPEC §2). The only code that makes masks.

One MC sample j of a response y (length L) given prompt x:
- a mask level: ``t_j ~ U(t_min,1]`` masking each token with probability t_j (weight 1/t_j), or
  ``l_j ~ U{1..L}`` masking exactly l_j tokens (weight L/l_j); iid or stratified across j;
- ``ℓ_θ(j) = w_j · Σ_{i masked} log p_θ(y_i | y_masked(j), x)`` and ``B̂_θ = mean_j ℓ_θ(j)``.
A ``Draws`` object stores the masks and weights explicitly, so θ, θ_old and the reference are
evaluated on the SAME (t_j, mask_j) — coupled sampling — by passing the same object.

The one-step estimator of diffu-GRPO / wd1 is ``mode="one_step"``: completion fully masked,
prompt tokens masked with probability ``p_prompt``, weight 1 (mean field); its n_t draws are the
μ inner iterations, each with a fresh prompt mask.

Padding and EOS (``window``): ``full`` scores the whole fixed-length completion window, EOS
padding included — the sequence the rollout sampler actually produced (the authors' VeRL port
does this). ``eos`` scores the tokens up to and including the first EOS (L_i varies by row, as
d1's completion mask); positions after it are masked in every draw and never scored, so they
carry no information about the answer. Prompt padding is never masked and never attended to.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bgpo.model import DLLM

Level = Literal["count", "time"]
Window = Literal["full", "eos"]
Mode = Literal["elbo", "one_step"]


@dataclass(frozen=True)
class ELBOConfig:
    mode: Mode = "elbo"
    """elbo: n_t masked samples (SPEC §2); one_step: d1's estimator (completion fully masked)"""
    level: Level = "time"
    """time: t ~ U(t_min,1], weight 1/t (BGPO paper: t_min = 0); count: l ~ U{1..L}, weight L/l (LLaDA 1.5)"""
    t_min: float = 0.0
    """time level: t = t_min + (1 − t_min)·(1 − u), as LLaDA's pre-training (t_min = 1e-3) — a floor on
    t bounds the weight 1/t and makes the estimator's variance finite (0: the paper's U(0,1])"""
    stratified: bool = False
    """stratify the n_t mask levels of a sequence (VeRL port: count levels k + j·L/n_t)"""
    window: Window = "full"
    """full: score the whole completion window incl. EOS padding; eos: up to the first EOS"""
    length_norm: bool = False
    """divide each ℓ(j) by the scored length L (VeRL port); d_j is then a mean token log-ratio"""
    p_prompt: float = 0.15
    """one_step mode: probability of masking each prompt token"""

    def __post_init__(self) -> None:
        for key, val, allowed in (("mode", self.mode, ("elbo", "one_step")),
                                  ("level", self.level, ("count", "time")),
                                  ("window", self.window, ("full", "eos"))):
            if val not in allowed:
                raise ValueError(f"elbo.{key}={val!r} is not one of {list(allowed)}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"elbo.t_min={self.t_min} must be in [0, 1)")
        if not 0.0 <= self.p_prompt < 1.0:
            raise ValueError(f"elbo.p_prompt={self.p_prompt} must be in [0, 1)")


@dataclass
class Batch:
    """One rollout batch: left-padded prompt then completion; responses grouped G per prompt."""

    input_ids: Tensor  # [B, P+L]
    attention_mask: Tensor  # [B, P+L]
    prompt_len: int  # P
    group_size: int  # G

    @classmethod
    def build(cls, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, G: int) -> Batch:
        """Prompt ``[B, P]`` (left-padded) + completion ``[B, L]`` (always attended)."""
        ones = torch.ones_like(completion, dtype=prompt_mask.dtype)
        return cls(torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, ones], 1),
                   prompt_ids.shape[1], G)

    @property
    def completion(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]  # [B, L]

    def select(self, rows: Tensor) -> Batch:
        """A sub-batch of whole prompt groups (``rows`` in group order)."""
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.prompt_len, self.group_size)

    def scored(self, window: Window, eos_id: int) -> Tensor:
        """Completion positions that are scored: ``[B, L]`` bool."""
        y = self.completion
        if window == "full":
            return torch.ones_like(y, dtype=torch.bool)
        is_eos = (y == eos_id).long()
        before_first_eos = (is_eos.cumsum(-1) - is_eos) == 0  # [B, L], first EOS included
        return before_first_eos


@dataclass
class Draws:
    """A replayable set of n_t MC draws for a batch (SPEC §2)."""

    masked: Tensor  # [n_t, B, P+L] bool: positions replaced by the mask token in sample j
    weight: Tensor  # [n_t, B] float64: w_j (1/t_j, L/l_j, or 1), length normalisation folded in
    scored: Tensor  # [B, L] bool: completion positions that enter ℓ

    @property
    def n_t(self) -> int:
        return self.masked.shape[0]

    def select(self, rows: Tensor) -> Draws:
        """The same draws for a sub-batch ``rows``."""
        return Draws(self.masked[:, rows], self.weight[:, rows], self.scored[rows])

    def chunks(self, size: int) -> Iterator[slice]:
        """Consecutive slices of at most ``size`` samples covering all n_t."""
        for lo in range(0, self.n_t, size):
            yield slice(lo, min(lo + size, self.n_t))


def draw(batch: Batch, cfg: ELBOConfig, n_t: int, eos_id: int,
         generator: torch.Generator | None = None) -> Draws:
    """Draw n_t mask patterns per sequence (seeded by ``generator``)."""
    if n_t < 1:
        raise ValueError(f"mc={n_t} must be >= 1")
    dev, P = batch.input_ids.device, batch.prompt_len
    scored = batch.scored(cfg.window, eos_id)  # [B, L]
    B, L = scored.shape
    L_i = scored.sum(-1)  # [B] scored length per sequence
    rand = lambda *shape: torch.rand(shape, generator=generator, device=dev, dtype=torch.float64)  # noqa: E731

    prompt_masked = torch.zeros(n_t, B, P, dtype=torch.bool, device=dev)
    if cfg.mode == "one_step":
        real_prompt = batch.attention_mask[:, :P].bool()  # [B, P]
        prompt_masked = (rand(n_t, B, P) < cfg.p_prompt) & real_prompt  # [n_t, B, P]
        comp_masked = torch.ones(n_t, B, L, dtype=torch.bool, device=dev)  # [n_t, B, L]
        weight = torch.ones(n_t, B, dtype=torch.float64, device=dev)  # [n_t, B]
    else:
        u = rand(n_t, B)  # [n_t, B]
        if cfg.stratified:  # one uniform per sequence, spread over n_t strata
            offsets = torch.arange(n_t, device=dev, dtype=torch.float64)[:, None] / n_t
            u = torch.remainder(u[:1] + offsets, 1.0)  # [n_t, B]
        if cfg.level == "time":
            t = cfg.t_min + (1.0 - cfg.t_min) * (1.0 - u)  # [n_t, B] in (t_min, 1]
            comp_masked = (rand(n_t, B, L) < t[..., None]) & scored  # [n_t, B, L]
            weight = 1.0 / t
        else:
            Lf = L_i.double()  # [B]
            l = torch.floor(u * Lf).clamp(max=Lf - 1) + 1  # [n_t, B] in {1..L_i}
            # exactly l_j of the scored positions, uniformly without replacement
            keys = rand(n_t, B, L).masked_fill(~scored, 2.0)  # [n_t, B, L]
            rank = keys.argsort(-1).argsort(-1)  # [n_t, B, L]
            comp_masked = rank < l[..., None]
            weight = Lf / l
        comp_masked = comp_masked | ~scored  # positions after EOS: always masked, never scored
    if cfg.length_norm:
        weight = weight / L_i.double().clamp(min=1)
    return Draws(torch.cat([prompt_masked, comp_masked], -1), weight, scored)


def token_logprobs(model: DLLM, batch: Batch, draws: Draws, js: slice) -> Tensor:
    """``log p_θ(y_i | masked input)`` at every completion position: ``[k, B, L]`` for samples js.

    One forward pass over the k samples stacked along the batch axis; gradients flow if enabled.
    """
    masked = draws.masked[js]  # [k, B, T]
    k = masked.shape[0]
    x = batch.input_ids.expand(k, -1, -1)  # [k, B, T]
    x = torch.where(masked, torch.full_like(x, model.mask_token_id), x).flatten(0, 1)  # [k*B, T]
    attn = batch.attention_mask.repeat(k, 1)  # [k*B, T]
    logits = model.logits(x, attn)[:, batch.prompt_len :]  # [k*B, L, V]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    y = batch.completion.repeat(k, 1)  # [k*B, L]
    logp = logits.gather(-1, y[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [k*B, L]
    return logp.view(k, *batch.completion.shape)  # [k, B, L]


def ell(model: DLLM, batch: Batch, draws: Draws, js: slice) -> Tensor:
    """Per-sample ELBO terms ``ℓ(j) = w_j Σ_{i masked, scored} log p(y_i|·)``: ``[k, B]``."""
    logp = token_logprobs(model, batch, draws, js)  # [k, B, L]
    P = batch.prompt_len
    hit = draws.masked[js][..., P:] & draws.scored  # [k, B, L]
    w = draws.weight[js].to(logp.dtype)  # [k, B]
    return w * (logp * hit).sum(-1)  # [k, B]


@torch.no_grad()
def ell_all(model: DLLM, batch: Batch, draws: Draws, chunk: int) -> Tensor:
    """``ℓ(j)`` for every sample without a graph (θ_old, reference): ``[n_t, B]``."""
    return torch.cat([ell(model, batch, draws, js) for js in draws.chunks(chunk)], 0)


@torch.no_grad()
def token_logprobs_all(model: DLLM, batch: Batch, draws: Draws) -> Tensor:
    """Per-token log-probs for every sample without a graph: ``[n_t, B, L]``."""
    return torch.cat([token_logprobs(model, batch, draws, slice(j, j + 1))
                      for j in range(draws.n_t)], 0)
