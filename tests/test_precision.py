"""Mixed precision and activation checkpointing (issue 12, items 3–4).

bf16-pure training at LLaDA's lr 5e-7 (BGPO §4) loses most AdamW updates to bfloat16 rounding;
bf16-mixed keeps float32 master weights and moments, so the update reaches nearly every element,
and its bfloat16-compute gradients stay close to float32's. Activation checkpointing recomputes
blocks, with LoRA too. FSDP2 with bf16-mixed and activation checkpointing trains on 2 gloo
processes and keeps float32 parameters.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bgpo.bench._common import method_partial
from bgpo.elbo import Batch
from bgpo.method import backward as method_backward
from bgpo.model import apply_lora, apply_precision, enable_activation_checkpointing, load_dllm
from bgpo.results import last_checkpoint, load_checkpoint
from bgpo.train import run
from bgpo.trainer import advantages
from tests.helpers import micro_model, random_batch
from tests.test_distributed import COMMON, ENV, ROOT, command
from tests.test_trainer import cfg_of


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def changed_fraction(run_dir, base, dtype: str) -> float:
    """Share of parameter elements whose stored value differs from the base model's."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    start = load_dllm("tiny", base, dtype).net.state_dict()
    moved = sum(int((state[k] != v).sum()) for k, v in start.items())
    return moved / sum(v.numel() for v in start.values())


def test_bf16_mixed_moves_nearly_every_weight_at_lr_5e7_bf16_pure_few(base_model, tmp_path):
    """Same seed, data and 3 BGPO steps at lr 5e-7: pure bf16 rounds most updates away."""
    common = ("method=bgpo", "lr=5e-7", "temperature=1.0", "eval_every=0")
    mixed = run(cfg_of(base_model, tmp_path / "mixed", *common, "model.precision=bf16-mixed"))
    pure = run(cfg_of(base_model, tmp_path / "pure", *common, "model.precision=bf16-pure",
                      "model.dtype=bfloat16"))
    f_mixed = changed_fraction(tmp_path / "mixed" / mixed["run"], base_model, "float32")
    f_pure = changed_fraction(tmp_path / "pure" / pure["run"], base_model, "bfloat16")
    print(f"changed elements: bf16-mixed {f_mixed:.4f}, bf16-pure {f_pure:.4f}")
    assert f_mixed > 0.95
    assert f_pure < 0.10
    state = torch.load(tmp_path / "mixed" / mixed["run"] / "checkpoints" / "last.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # master weights
    moments = [t for s in state["opt"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)  # AdamW state


def _grads(model, batch: Batch, adv: torch.Tensor) -> torch.Tensor:
    impl = method_partial("bgpo", 2)(ref=None)
    model.net.zero_grad(set_to_none=True)
    prep = impl.prepare(model, batch, 1, torch.Generator().manual_seed(0))
    method_backward(impl, model, batch, adv, prep, 0)
    return torch.cat([p.grad.float().flatten() for p in model.net.parameters() if p.requires_grad])


def test_bf16_mixed_gradients_are_close_to_fp32():
    fp32 = micro_model(dtype=torch.float32)
    mixed = apply_precision(micro_model(dtype=torch.float32), "bf16-mixed")
    batch = random_batch(fp32, n_prompts=2, G=4, P=6, L=8)
    adv = advantages(torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 0]), 4, True)
    g32, gmix = _grads(fp32, batch, adv), _grads(mixed, batch, adv)
    assert all(p.grad.dtype == torch.float32 for p in mixed.net.parameters())
    rel = ((gmix - g32).norm() / g32.norm()).item()
    cos = torch.nn.functional.cosine_similarity(gmix, g32, dim=0).item()
    print(f"bf16-mixed vs fp32 gradient: relative error {rel:.4f}, cosine {cos:.5f}")
    assert rel < 0.05 and cos > 0.999
    assert not torch.equal(gmix, g32)  # it did compute in bfloat16


@pytest.mark.parametrize("precision,dtype,key", [("bf16-mixed", "bfloat16", "model.dtype=float32"),
                                                 ("bf16-pure", "float32", "model.dtype=bfloat16"),
                                                 ("fp16", "float32", "model.precision='fp16'")])
def test_precision_and_dtype_must_agree_at_start_up(base_model, tmp_path, precision, dtype, key):
    from bgpo.validate import validate_train

    with pytest.raises(ValueError, match=key):
        validate_train(cfg_of(base_model, tmp_path, f"model.precision={precision}", f"model.dtype={dtype}"))


def test_activation_checkpointing_with_lora_gives_the_same_gradients():
    batch = random_batch(micro_model(), n_prompts=1, G=3, P=5, L=6)
    adv = advantages(torch.tensor([1.0, 0.0, 0.5]), 3, True)
    grads = []
    for checkpointed in (False, True):
        model = micro_model(dtype=torch.float64)
        model.net.train()
        calls = []
        for name, m in model.net.named_modules():
            if name.endswith("self_attn.k_proj"):
                m.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        if checkpointed:
            enable_activation_checkpointing(model.net)
        apply_lora(model, 4, 8, 0.0)
        for n, p in model.net.named_parameters():  # LoRA B starts at 0: make its gradient informative
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
        grads.append((_grads(model, batch, adv), len(calls)))
    (plain, n_plain), (ckpt, n_ckpt) = grads
    assert n_ckpt == 2 * n_plain  # every block ran twice: forward, then recomputed in backward
    torch.testing.assert_close(ckpt, plain, atol=1e-12, rtol=1e-9)


@pytest.mark.slow
def test_fsdp_bf16_mixed_with_checkpointing_trains_and_keeps_fp32_parameters(base_model, tmp_path):
    """2 gloo processes, FSDP2 + MixedPrecisionPolicy(bf16, fp32 reduce) + activation checkpointing on
    the toy task, whose rewards vary, so the update is not zero (the dry run's random miniatures
    score 0 on the paper's tasks)."""
    out = tmp_path / "fsdp"
    args = [*command(2, 29531), f"model.path={base_model}", *COMMON, "steps=1", "parallel=fsdp",
            "model.precision=bf16-mixed", "model.activation_checkpointing=true", "weight_decay=0.0",
            f"results_dir={out}"]
    res = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (summary,) = out.glob("*/summary.json")
    s = json.loads(summary.read_text())
    assert s["world_size"] == 2 and s["parallel"] == "fsdp"
    assert s["param_fingerprints"][0] == s["param_fingerprints"][1]
    state = load_checkpoint(last_checkpoint(summary.parent))  # last.dcp: every rank's shards, put together
    start = load_dllm("tiny", base_model).net.state_dict()
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # master weights
    moved = sum(int((state["model"][k] != v).sum()) for k, v in start.items())
    assert moved > 0.5 * sum(v.numel() for v in start.values())  # no weight decay: gradient steps
