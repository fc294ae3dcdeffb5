"""What the two rollout samplers share (``bgpo.sampler``, the reference; ``bgpo.sampler_cached``,
the fast one): the sampler's settings and their checks, the number of tokens committed per step,
and the Gumbel-max draw. ``bgpo.sampler`` re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplerConfig:
    gen_length: int = 32
    """completion length L (tokens), EOS padding included"""
    block_length: int = 8
    """semi-autoregressive block size; must divide gen_length"""
    steps: int = 32
    """total denoising steps; must be a multiple of the number of blocks"""
    temperature: float = 0.0
    """0 = greedy; > 0 = Gumbel-max sampling in float64"""
    mode: str = "reference"
    """reference (LLaDA's sampler, above) or cached (bgpo.sampler_cached: KV cache + parallel decoding)"""
    threshold: float = 1.0
    """cached mode: also commit every masked position of the block whose confidence exceeds this
    (1.0 = none: the reference schedule's k tokens per step)"""
    cache: str = "prefix"
    """cached mode: prefix (cache prompt + decoded blocks), dual (also the masked suffix) or none"""

    def __post_init__(self) -> None:
        validate_schedule(self.gen_length, self.block_length, self.steps, self.temperature)
        validate_mode(self.mode, self.threshold, self.cache)


def validate_schedule(gen_length: int, block_length: int, steps: int, temperature: float = 0.0) -> None:
    """Clear start-up errors naming the key (``sampler.*``)."""
    for key, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"sampler.{key}={v!r} must be a positive integer")
    if gen_length % block_length:
        raise ValueError(
            f"sampler.gen_length={gen_length} must be a multiple of sampler.block_length={block_length}"
        )
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"sampler.steps={steps} must be a multiple of the number of blocks "
                         f"(gen_length/block_length = {blocks})")
    if temperature < 0:
        raise ValueError(f"sampler.temperature={temperature} must be >= 0")


MODES = ("reference", "cached")
CACHES = ("prefix", "dual", "none")


def validate_mode(mode: str, threshold: float = 1.0, cache: str = "prefix") -> None:
    """Clear start-up errors for the fast-rollout keys (``sampler.mode/threshold/cache``)."""
    if mode not in MODES:
        raise ValueError(f"sampler.mode={mode!r} is not one of {list(MODES)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"sampler.threshold={threshold} must be in [0, 1]")
    if cache not in CACHES:
        raise ValueError(f"sampler.cache={cache!r} is not one of {list(CACHES)}")


def transfer_schedule(n_masked: Tensor, steps: int) -> Tensor:
    """How many tokens to commit at each step: ``[B, steps]``, spread evenly, extras first."""
    base = n_masked // steps  # [B]
    extra = n_masked % steps  # [B]
    idx = torch.arange(steps, device=n_masked.device)
    return base[:, None] + (idx[None, :] < extra[:, None]).long()


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax at temperature 0; Gumbel-max sample of softmax(logits / T) in float64 otherwise."""
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)
