"""THE Monte Carlo ELBO sampler shared by every method (docs/methods.md §2). The only code that makes masks.

One MC sample j of a response y (length L) given prompt x:
- a mask level: ``t_j ~ U(t_min,1]`` masking each token with probability t_j (weight 1/t_j), or
  ``l_j ~ U{1..L}`` masking exactly l_j tokens (weight L/l_j); iid or stratified across j;
- ``ℓ_θ(j) = w_j · Σ_{i masked} log p_θ(y_i | y_masked(j), x)`` and ``B̂_θ = mean_j ℓ_θ(j)``.
A ``Draws`` object stores the masks and weights explicitly, so θ, θ_old and the reference are
evaluated on the SAME (t_j, mask_j) — coupled sampling — by passing the same object.

The one-step estimator of diffu-GRPO / wd1 is ``mode="one_step"``: completion fully masked,
prompt tokens masked with probability ``p_prompt``, weight 1 (mean field); its n_t draws are the
μ inner iterations, each with a fresh prompt mask.

Beyond docs/methods.md §2, the draws of the methods that came after BGPO (each a ``mode``; every one fills
``Draws.target``, the completion positions that enter ℓ(j), when it differs from masked ∧ scored):
- ``complementary`` (DiffuCoder §5 / eq. 13, ESPO): n_t PAIRS (m, ¬m) over the scored window, so
  every scored token is masked exactly once per pair; time levels (t, 1 − t) with weights 1/t and
  1/(1 − t), or count levels (l, L − l) with l ~ U{0..L} and weights (L+1)/l, (L+1)/(L − l) (both
  unbiased per mask); ``full_mask`` appends DiffuCoder's fully-masked draw (weight 1);
- ``block`` (SPG §3.3): a block b of ``block_length`` drawn uniformly among the K blocks holding
  scored tokens; earlier blocks clean (each token, like the prompt, masked with ``p_prompt``),
  later blocks fully masked, a count or time level inside block b; the target is block b's masked
  tokens, weight K·n_b/l (count) or K/t (time): an unbiased ELBO of the block-wise (semi-AR)
  decoder's likelihood, Σ_b ELBO(y_b | y_<b, masked suffix);
- ``ar`` (JustGRPO): draw j masks every completion position ≥ k_j and targets position k_j only,
  exactly the state a left-to-right decoder was in when it chose y_k; n_t ≥ L visits k = 0..L−1
  (the exact AR log-likelihood), fewer samples positions without replacement, weight L/n;
- ``trajectory`` (TraceRL §3): from the step at which the rollout sampler committed each position
  (``Batch.trace``): the trajectory's distinct steps merged into n_t groups of s = ⌈steps/n_t⌉;
  draw g masks the positions committed in group g or later (the sampler's state before group g)
  and targets those of group g; weight 1, so Σ_g ℓ(g) is the trajectory log-likelihood (s = 1:
  exactly the sampler's own states).

Padding and EOS (``window``): ``full`` scores the whole fixed-length completion window, EOS padding
included — the sequence the rollout sampler actually produced (the authors' VeRL port does this).
``eos`` scores the tokens up to and including the first EOS (L_i varies by row, as d1's completion
mask); positions after it are masked in every draw and never scored, so they carry no information
about the answer (``trajectory`` draws follow the sampler's own states instead: a post-EOS position
is masked only while the sampler had not yet committed it). Prompt padding is never masked and never
attended to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bgpo.model import DLLM

Level = Literal["count", "time"]
Window = Literal["full", "eos"]
Mode = Literal["elbo", "one_step", "complementary", "block", "ar", "trajectory"]
MODES = ("elbo", "one_step", "complementary", "block", "ar", "trajectory")


@dataclass(frozen=True)
class ELBOConfig:
    mode: Mode = "elbo"
    """elbo: n_t masked samples (docs/methods.md §2); one_step: d1's estimator (completion fully masked);
    complementary / block / ar / trajectory: see the module doc"""
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
    """one_step and block modes: probability of masking each prompt token (block: and each token of
    the clean blocks before the drawn one, SPG §3.3 after d1)"""
    block_length: int = 32
    """block mode: the block size of the semi-AR decoder (SPG: the sampler's block_length)"""
    full_mask: bool = False
    """complementary mode: append one fully-masked draw, weight 1 (DiffuCoder's L_T, eq. 13)"""
    group_shared: bool = False
    """elbo mode: the G completions of a prompt share their n_t mask draws (levels and positions:
    common random numbers). Each completion's ELBO estimate is unchanged in distribution (unbiased
    as before); across the group, the gradient terms of tokens the completions share, in nearly
    the same context, now cancel under advantages that sum to zero instead of adding noise"""

    def patterns(self, n_t: int) -> int:
        """Mask patterns ``draw`` returns for n_t samples (ar mode: at most this many)."""
        if self.mode == "complementary":
            return 2 * n_t + int(self.full_mask)
        return n_t

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        for key, val, allowed in (("mode", self.mode, MODES),
                                  ("level", self.level, ("count", "time")),
                                  ("window", self.window, ("full", "eos"))):
            if val not in allowed:
                raise ValueError(f"elbo.{key}={val!r} is not one of {list(allowed)}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"elbo.t_min={self.t_min} must be in [0, 1)")
        if not 0.0 <= self.p_prompt < 1.0:
            raise ValueError(f"elbo.p_prompt={self.p_prompt} must be in [0, 1)")
        if self.mode == "complementary" and not self.t_min < 0.5:
            raise ValueError(f"elbo.t_min={self.t_min} must be < 0.5 in complementary mode (t and 1 − t "
                             "both lie in [t_min, 1 − t_min])")
        if self.group_shared and self.mode != "elbo":
            raise ValueError(f"elbo.group_shared=true applies to mode 'elbo' only, not {self.mode!r}")
        if not (isinstance(self.block_length, int) and self.block_length >= 1):
            raise ValueError(f"elbo.block_length={self.block_length!r} must be a positive integer")


@dataclass
class Batch:
    """One rollout batch: left-padded prompt then completion; responses grouped G per prompt."""

    input_ids: Tensor  # [B, P+L]
    attention_mask: Tensor  # [B, P+L]
    prompt_len: int  # P
    group_size: int  # G
    trace: Tensor | None = None  # [B, L] long: the sampler step that committed each position (rollouts)

    @classmethod
    def build(cls, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, G: int,
              trace: Tensor | None = None) -> Batch:
        """Prompt ``[B, P]`` (left-padded) + completion ``[B, L]`` (always attended)."""
        ones = torch.ones_like(completion, dtype=prompt_mask.dtype)
        return cls(torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, ones], 1),
                   prompt_ids.shape[1], G, trace)

    @property
    def completion(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]  # [B, L]

    def select(self, rows: Tensor) -> Batch:
        """A sub-batch of whole prompt groups (``rows`` in group order)."""
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.prompt_len, self.group_size,
                     None if self.trace is None else self.trace[rows])

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
    """A replayable set of n_t MC draws for a batch (docs/methods.md §2)."""

    masked: Tensor  # [n_t, B, P+L] bool: positions replaced by the mask token in sample j
    weight: Tensor  # [n_t, B] float64: w_j (1/t_j, L/l_j, or 1), length normalisation folded in
    scored: Tensor  # [B, L] bool: completion positions that enter ℓ
    target: Tensor | None = None  # [n_t, B, L] bool: positions of ℓ(j) (None: masked ∧ scored)

    @property
    def n_t(self) -> int:
        return self.masked.shape[0]

    def hit(self, js: slice) -> Tensor:
        """The completion positions that enter ℓ(j) for samples js: ``[k, B, L]`` bool."""
        if self.target is not None:
            return self.target[js]
        return self.masked[js][..., self.masked.shape[-1] - self.scored.shape[-1] :] & self.scored

    def select(self, rows: Tensor) -> Draws:
        """The same draws for a sub-batch ``rows``."""
        return Draws(self.masked[:, rows], self.weight[:, rows], self.scored[rows],
                     None if self.target is None else self.target[:, rows])

    @staticmethod
    def cat(parts: list[Draws]) -> Draws:
        """Several sets of draws of one batch, one after the other along n_t."""
        target = None
        if any(d.target is not None for d in parts):
            target = torch.cat([d.hit(slice(None)) for d in parts])  # [Σ n_t, B, L]
        return Draws(torch.cat([d.masked for d in parts]), torch.cat([d.weight for d in parts]),
                     parts[0].scored, target)

    def chunks(self, size: int) -> Iterator[slice]:
        """Consecutive slices of at most ``size`` samples covering all n_t."""
        for lo in range(0, self.n_t, size):
            yield slice(lo, min(lo + size, self.n_t))


def draw(batch: Batch, cfg: ELBOConfig, n_t: int, eos_id: int,
         generator: torch.Generator | None = None) -> Draws:
    """Draw n_t mask patterns per sequence (seeded by ``generator``); complementary mode: n_t PAIRS,
    2·n_t patterns (+1 with ``full_mask``); ar mode: min(n_t, L)."""
    if n_t < 1:
        raise ValueError(f"mc={n_t} must be >= 1")
    dev, P = batch.input_ids.device, batch.prompt_len
    scored = batch.scored(cfg.window, eos_id)  # [B, L]
    B, L = scored.shape
    L_i = scored.sum(-1)  # [B] scored length per sequence
    rand = lambda *shape: torch.rand(shape, generator=generator, device=dev, dtype=torch.float64)  # noqa: E731

    prompt_masked = torch.zeros(n_t, B, P, dtype=torch.bool, device=dev)
    if cfg.mode in _BEYOND:
        comp_masked, weight, target, prompt_masked = _BEYOND[cfg.mode](batch, cfg, n_t, scored, rand)
        if cfg.length_norm:
            weight = weight / L_i.double().clamp(min=1)
        return Draws(torch.cat([prompt_masked, comp_masked], -1), weight, scored, target)
    if cfg.mode == "one_step":
        real_prompt = batch.attention_mask[:, :P].bool()  # [B, P]
        prompt_masked = (rand(n_t, B, P) < cfg.p_prompt) & real_prompt  # [n_t, B, P]
        comp_masked = torch.ones(n_t, B, L, dtype=torch.bool, device=dev)  # [n_t, B, L]
        weight = torch.ones(n_t, B, dtype=torch.float64, device=dev)  # [n_t, B]
    else:
        # group_shared: one draw per prompt, repeated for its G completions (common random numbers)
        G = batch.group_size if cfg.group_shared else 1
        shared = lambda x: x.repeat_interleave(G, dim=1) if G > 1 else x  # noqa: E731  [n_t, B/G, ...] -> [n_t, B, ...]
        u = shared(rand(n_t, B // G))  # [n_t, B]
        if cfg.stratified:  # one uniform per sequence, spread over n_t strata
            offsets = torch.arange(n_t, device=dev, dtype=torch.float64)[:, None] / n_t
            u = torch.remainder(u[:1] + offsets, 1.0)  # [n_t, B]
        if cfg.level == "time":
            t = cfg.t_min + (1.0 - cfg.t_min) * (1.0 - u)  # [n_t, B] in (t_min, 1]
            comp_masked = (shared(rand(n_t, B // G, L)) < t[..., None]) & scored  # [n_t, B, L]
            weight = 1.0 / t
        else:
            Lf = L_i.double()  # [B]
            l = torch.floor(u * Lf).clamp(max=Lf - 1) + 1  # [n_t, B] in {1..L_i}
            # exactly l_j of the scored positions, uniformly without replacement
            keys = shared(rand(n_t, B // G, L)).masked_fill(~scored, 2.0)  # [n_t, B, L]
            rank = keys.argsort(-1).argsort(-1)  # [n_t, B, L]
            comp_masked = rank < l[..., None]
            weight = Lf / l
        comp_masked = comp_masked | ~scored  # positions after EOS: always masked, never scored
    if cfg.length_norm:
        weight = weight / L_i.double().clamp(min=1)
    return Draws(torch.cat([prompt_masked, comp_masked], -1), weight, scored)


def draw_updates(batch: Batch, cfg: ELBOConfig, n_t: int, mu: int, eos_id: int,
                 generator: torch.Generator | None = None) -> Draws:
    """μ independent sets of n_t samples, one per inner update, one after the other (each set
    stratified on its own); update ``it`` owns patterns ``it·k … (it+1)·k − 1``, k = cfg.patterns(n_t)."""
    return Draws.cat([draw(batch, cfg, n_t, eos_id, generator) for _ in range(mu)])


# ---- the draws of the methods beyond BGPO (module doc); each returns (completion masked
# [k, B, L], weight [k, B], target [k, B, L] or None, prompt masked [k, B, P]) --------------------
Rand = Callable[..., Tensor]


def _levels(u: Tensor, stratified: bool) -> Tensor:
    """One uniform per (sample, sequence), or one per sequence spread over the n_t strata: [n, B]."""
    if not stratified:
        return u
    offsets = torch.arange(u.shape[0], device=u.device, dtype=torch.float64)[:, None] / u.shape[0]
    return torch.remainder(u[:1] + offsets, 1.0)


def _exactly(count: Tensor, allowed: Tensor, rand: Rand) -> Tensor:
    """``count`` [n, B] positions of ``allowed`` [n, B, L], uniformly without replacement."""
    keys = rand(*allowed.shape).masked_fill(~allowed, 2.0)  # [n, B, L]
    return (keys.argsort(-1).argsort(-1) < count[..., None]) & allowed


def _complementary(batch: Batch, cfg: ELBOConfig, n_t: int, scored: Tensor, rand: Rand) -> tuple:
    B, L = scored.shape
    L_i = scored.sum(-1).double()  # [B]
    u = _levels(rand(n_t, B), cfg.stratified)  # [n_t, B]
    if cfg.level == "time":
        t = cfg.t_min + (1.0 - 2 * cfg.t_min) * (1.0 - u)  # [n_t, B] in (t_min, 1 − t_min]
        m = (rand(n_t, B, L) < t[..., None]) & scored  # [n_t, B, L]
        w, w_c = 1.0 / t, torch.where(t < 1, 1.0 / (1.0 - t).clamp(min=1e-300), 0.0)  # 1/t, 1/(1 − t)
    else:
        l = torch.floor(u * (L_i + 1)).clamp(max=L_i)  # [n_t, B] in {0..L_i}
        m = _exactly(l, scored.expand(n_t, B, L), rand)  # [n_t, B, L]
        w = torch.where(l > 0, (L_i + 1) / l.clamp(min=1), 0.0)  # (L+1)/l
        w_c = torch.where(l < L_i, (L_i + 1) / (L_i - l).clamp(min=1), 0.0)  # (L+1)/(L − l)
    comp = torch.stack([m, scored & ~m], 1).flatten(0, 1)  # [2n_t, B, L]: m_0, ¬m_0, m_1, ¬m_1...
    weight = torch.stack([w, w_c], 1).flatten(0, 1)  # [2n_t, B]
    if cfg.full_mask:  # DiffuCoder's L_T: every scored token masked, weight 1
        comp = torch.cat([comp, scored[None]], 0)
        weight = torch.cat([weight, torch.ones_like(weight[:1])], 0)
    prompt = torch.zeros(comp.shape[0], B, batch.prompt_len, dtype=torch.bool, device=scored.device)
    return comp | ~scored, weight, None, prompt


def _block(batch: Batch, cfg: ELBOConfig, n_t: int, scored: Tensor, rand: Rand) -> tuple:
    B, L = scored.shape
    bl, pos = cfg.block_length, torch.arange(L, device=scored.device)  # pos: [L]
    L_i = scored.sum(-1)  # [B] (the scored window is a prefix of the completion)
    K = ((L_i + bl - 1) // bl).clamp(min=1)  # [B] blocks holding scored tokens
    b = torch.floor(_levels(rand(n_t, B), cfg.stratified) * K).long().clamp(max=K - 1)  # [n_t, B]
    lo = b * bl  # [n_t, B]
    n_b = torch.minimum(lo + bl, L_i) - lo  # [n_t, B] scored tokens of block b
    in_block = (pos >= lo[..., None]) & (pos < (lo + n_b)[..., None])  # [n_t, B, L]
    if cfg.level == "time":
        t = cfg.t_min + (1.0 - cfg.t_min) * (1.0 - rand(n_t, B))  # [n_t, B]
        target = (rand(n_t, B, L) < t[..., None]) & in_block
        weight = K / t  # [n_t, B]
    else:
        l = torch.floor(rand(n_t, B) * n_b).clamp(max=n_b - 1) + 1  # [n_t, B] in {1..n_b}
        target = _exactly(l, in_block, rand)
        weight = K * n_b / l
    clean = (rand(n_t, B, L) < cfg.p_prompt) & (pos < lo[..., None])  # [n_t, B, L] earlier blocks
    later = pos >= (lo + bl)[..., None]  # [n_t, B, L] later blocks: fully masked
    real_prompt = batch.attention_mask[:, : batch.prompt_len].bool()  # [B, P]
    prompt = (rand(n_t, B, batch.prompt_len) < cfg.p_prompt) & real_prompt  # [n_t, B, P]
    return target | clean | later | ~scored, weight.double(), target, prompt


def _ar(batch: Batch, cfg: ELBOConfig, n_t: int, scored: Tensor, rand: Rand) -> tuple:
    B, L = scored.shape
    pos, L_i = torch.arange(L, device=scored.device), scored.sum(-1)  # [L], [B]
    n = min(n_t, L)
    if n_t >= L:  # every position once, in order: the exact AR log-likelihood
        k = pos[:, None].expand(L, B)  # [L, B]
    else:  # n distinct scored positions per sequence
        k = rand(B, L).masked_fill(~scored, 2.0).argsort(-1)[:, :n].T  # [n, B]
    valid = scored.gather(1, k.T.contiguous()).T  # [n, B]: draw j has a scored position in row b
    k = torch.where(valid, k, L_i[None].expand(n, B))  # empty draws mask only the unscored tail
    masked = pos >= k[..., None]  # [n, B, L]: the future (and k itself) masked
    target = (pos == k[..., None]) & valid[..., None]  # [n, B, L]: position k only
    weight = (L_i / L_i.clamp(max=n).clamp(min=1)).double().expand(n, B)  # [n, B] L/n
    prompt = torch.zeros(n, B, batch.prompt_len, dtype=torch.bool, device=scored.device)
    return masked | ~scored, weight, target, prompt


def _trajectory(batch: Batch, cfg: ELBOConfig, n_t: int, scored: Tensor, rand: Rand) -> tuple:
    if batch.trace is None:
        raise ValueError("elbo.mode=trajectory needs the rollout sampler's trace (Batch.trace: the step "
                         "that committed each position); build the batch with bgpo.rollout.rollout")
    B, L = scored.shape
    group = torch.empty_like(batch.trace)  # [B, L]
    for b in range(B):  # the row's distinct steps, merged s at a time into n_t groups
        steps, rank = torch.unique(batch.trace[b], return_inverse=True)
        group[b] = rank // -(-steps.numel() // n_t)
    g = torch.arange(n_t, device=scored.device)[:, None, None]  # [n_t, 1, 1]
    masked = group[None] >= g  # [n_t, B, L]: the sampler's state before group g
    target = (group[None] == g) & scored  # [n_t, B, L]: what it committed in group g
    weight = torch.ones(n_t, B, dtype=torch.float64, device=scored.device)
    prompt = torch.zeros(n_t, B, batch.prompt_len, dtype=torch.bool, device=scored.device)
    return masked, weight, target, prompt


_BEYOND = {"complementary": _complementary, "block": _block, "ar": _ar, "trajectory": _trajectory}


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
    """Per-sample ELBO terms ``ℓ(j) = w_j Σ_{i ∈ target_j} log p(y_i|·)``: ``[k, B]`` (target: the
    masked scored positions unless the mode says otherwise)."""
    logp = token_logprobs(model, batch, draws, js)  # [k, B, L]
    hit = draws.hit(js)  # [k, B, L]
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
