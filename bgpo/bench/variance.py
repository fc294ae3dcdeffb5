"""``python -m bgpo.bench variance``: the estimators' noise (issue 5; BGPO's Fig. 3, LLaDA 1.5's
Table 2). Plotting-ready rows in ``<out>/variance-<model>.jsonl``, one per figure point:

- ``kind = "grad"`` (Fig. 3): the gradient of ONE fixed batch (rollouts of the model on the task's
  training prompts at ``--temperature``, their rewards; on-policy, θ = θ_old) computed
  ``--repeats`` times with fresh MC draws, for each method and n_t: ``grad_std`` is the standard
  deviation over the repeats of each parameter's gradient, averaged over parameters (``grad_std_rel``
  divides it by the gold gradient's mean |·|); ``bias_rel`` = ‖mean of the repeats − gold‖ / ‖gold‖
  and ``dist_rel`` = mean over repeats of ‖ĝ − gold‖ / ‖gold‖, where the gold standard is the same
  method's gradient at n_t = ``--gold-mc`` (256). On-policy every method's gradient is the mean of
  its per-draw gradients, so the gold is computed as the mean of ``gold_mc / gold_chunk`` independent
  n_t = ``gold_chunk`` gradients: the same number as one n_t = 256 call for iid draws, in the memory
  of n_t = 32 (VRPO-OL at 256 would hold 256 graphs);
- ``kind = "gold"``: each method's gold gradient norm and its cosine with BGPO's (diffu-GRPO's
  one-step estimator targets a different quantity; BGPO and VRPO-OL share their expectation);
- ``kind = "onpolicy_check"``: BGPO's and VRPO-OL's gradients on the SAME draws (docs/methods.md §3: equal);
- ``kind = "elbo_diff"`` (LLaDA 1.5, Table 2): the variance of ``B̂_θ − B̂_old`` over
  ``--diff-replicates`` replicates at a perturbed θ (every weight + ``--perturb`` × its tensor's RMS
  × N(0,1)), for n MC samples ∈ ``--diff-ns``: ``coupled`` (θ and θ_old on the same masks) or
  independent (replicate r's B̂_θ against replicate r + R/2's B̂_old: R/2 independent pairs), level
  ``time`` (t ~ U(0,1], weight 1/t) or ``count`` (l ~ U{1..L}, weight L/l), iid or stratified
  levels; averaged over the first ``--diff-seqs`` sequences of the batch. ``var_theta`` is
  Var(B̂_θ) alone, ``mean_diff`` the mean of B̂_θ − B̂_old.

The methods after BGPO (``--methods``): n_t is each one's cost knob (SPG and ESPO MC samples, ESPO
and coupled-GRPO complementary pairs, TraceRL trajectory groups, JustGRPO AR positions). TraceRL's
draws are deterministic (grad_std 0; what n_t changes is how many steps share a forward pass),
JustGRPO is exact once n_t ≥ L; SPG's EUBO is a log of a mean over draws, so its gold (a mean of
n_t = gold_chunk gradients) is not its own n_t = gold_mc gradient.

Default cost (tiny model, 2 CPU cores): 8 methods × (8 × 63 + 256) gradients of n_t samples each on
a 1 × 8 batch of Countdown rollouts plus 4 × 2 × 13 × 32 forward-only draws of 4 sequences.

    python -m bgpo.bench variance
    python -m bgpo.bench variance --mcs 1,4,16 --repeats 4 --gold-mc 64   # quicker
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.bench._common import (
    CHUNKED,
    METHODS,
    ModelSpec,
    bench_main,
    check_model_args,
    common_meta,
    compose_train,
    ints,
    load_model,
    load_rows,
    make_ref,
    method_partial,
    model_spec,
    needs_ref,
    std_adv,
    strs,
    write_rows,
)
from bgpo.elbo import Batch, Draws, ELBOConfig
from bgpo.method import backward as method_backward
from bgpo.model import DLLM
from bgpo.trainer import advantages

__all__ = ["fixed_batch", "load_rows", "main"]

GRAD_METHODS = ("diffu_grpo", "vrpo", "bgpo", "spg", "espo", "coupled_grpo", "tracerl", "just_grpo")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.bench variance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=strs, default=list(GRAD_METHODS))
    p.add_argument("--mcs", type=ints, default=ints("1,2,4,8,16,32"), help="n_t values")
    p.add_argument("--repeats", type=int, default=8, help="gradients per (method, n_t)")
    p.add_argument("--gold-mc", type=int, default=256, help="n_t of the gold-standard gradient")
    p.add_argument("--gold-chunk", type=int, default=32, help="n_t per gold call (memory)")
    p.add_argument("--chunk", type=int, default=8, help="method.cfg.mc_chunk of bgpo/vrpo (speed only)")
    p.add_argument("--model", default="tiny", help="tiny (the shipped, else cached, base) or a folder")
    p.add_argument("--arch", default=None, help="random model: hidden=..,layers=..,heads=..,intermediate=..")
    p.add_argument("--name", default=None)
    p.add_argument("--task", default="countdown")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=1, help="prompt groups in the fixed batch")
    p.add_argument("--group", type=int, default=8, help="G")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-tries", type=int, default=64, help="prompts tried to find mixed-reward groups")
    p.add_argument("--diff-ns", type=ints, default=ints("1,4,8"))
    p.add_argument("--diff-replicates", type=int, default=32)
    p.add_argument("--diff-seqs", type=int, default=8)
    p.add_argument("--perturb", type=float, default=0.02, help="θ = θ_old + perturb·RMS·N(0,1)")
    p.add_argument("--tail-draws", type=int, default=4096,
                   help="single draws per estimator for its tail statistics (kind=estimator)")
    p.add_argument("--override", action="append", default=[], help="Hydra override for the methods")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the tiny model's ops gain nothing from more, and a thread team "
                   "stalls whenever another process holds a core; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    check_model_args(p, args)
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        p.error(f"--methods: unknown {bad}")
    if args.repeats < 2:
        p.error("--repeats must be >= 2 (a standard deviation)")
    if args.gold_mc % min(args.gold_chunk, args.gold_mc):
        p.error("--gold-mc must be a multiple of --gold-chunk")
    if args.diff_replicates < 4:
        p.error("--diff-replicates must be >= 4")
    return args


# ---- the fixed batch ----------------------------------------------------------------------------
def fixed_batch(policy: DLLM, task_name: str, prompts: int, G: int, temperature: float, seed: int,
                max_tries: int) -> tuple[Batch, Tensor, int]:
    """Rollouts of ``policy`` on the task's training prompts, keeping the first ``prompts`` groups
    whose rewards are not all equal; groups still missing after ``max_tries`` prompts are taken
    from the first tried, with synthetic rewards (1, 0, then Bernoulli(½)). Returns the batch, the
    rewards and the number of synthetic groups. The batch keeps the sampler's trace (TraceRL)."""
    from bgpo.rollout import rollout
    from bgpo.tasks import get_task

    cfg = compose_train([f"task={task_name}"])
    task = get_task(cfg.task.name, test_file=cfg.task.test_file, n_test=cfg.task.n_test, **cfg.task.options)
    exs = task.train_examples(max_tries, seed)
    g = torch.Generator(device=policy.device).manual_seed(seed)
    kept: list[tuple[str, Tensor, Tensor, Tensor]] = []  # (prompt, completions, rewards, trace)
    spare: list[tuple[str, Tensor, Tensor, Tensor]] = []
    was_training = policy.net.training
    policy.net.eval()
    for lo in range(0, max_tries, 16):
        chunk = exs[lo : lo + 16]
        ro = rollout(policy, task, chunk, cfg.task, G, temperature, g)
        comp, r = ro.batch.completion.view(len(chunk), G, -1), ro.rewards.view(len(chunk), G)
        trace = ro.batch.trace.view(len(chunk), G, -1)
        for i, ex in enumerate(chunk):
            item = (task.render(ex, cfg.task.format), comp[i], r[i], trace[i])
            (kept if r[i].std() > 0 else spare).append(item)
        if len(kept) >= prompts:
            break
    policy.net.train(was_training)
    synthetic = max(prompts - len(kept), 0)
    rng = torch.Generator().manual_seed(seed)
    for text, comp, _, trace in spare[:synthetic]:
        r = (torch.rand(G, generator=rng) < 0.5).double()
        r[0], r[1] = 1.0, 0.0
        kept.append((text, comp, r, trace))
    kept = kept[:prompts]
    prompt_ids, prompt_mask = policy.encode_prompts([k[0] for k in kept for _ in range(G)])
    comp = torch.cat([k[1] for k in kept], 0)
    rewards = torch.cat([k[2] for k in kept], 0)
    trace = torch.cat([k[3] for k in kept], 0)
    return Batch.build(prompt_ids, prompt_mask, comp, G, trace), rewards, synthetic


# ---- gradients ----------------------------------------------------------------------------------
def flat_grad(policy: DLLM) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                      for p in policy.net.parameters() if p.requires_grad])


def gradient(policy: DLLM, impl: Any, adv: Tensor, batch: Batch, seed: int) -> Tensor:
    """The method's on-policy gradient of the batch with MC draws seeded by ``seed``: ``[n_params]``."""
    policy.net.zero_grad(set_to_none=True)
    g = torch.Generator(device=policy.device).manual_seed(seed)
    prep = impl.prepare(policy, batch, 1, g)
    method_backward(impl, policy, batch, adv, prep, 0)
    return flat_grad(policy)


def _cos(a: Tensor, b: Tensor) -> float:
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-300)).item()


def grad_rows(args: argparse.Namespace, policy: DLLM, batch: Batch, rewards: Tensor,
              bar: Any) -> list[dict[str, Any]]:
    ref = None
    rows: list[dict[str, Any]] = []
    golds: dict[str, Tensor] = {}
    seeds = itertools.count(10**6 * (args.seed + 1))  # every gradient gets its own fresh MC draws

    def build(m: str, n_t: int) -> tuple[Any, Tensor]:
        nonlocal ref
        extra = [f"method.cfg.mc_chunk={min(args.chunk, n_t)}"] if m in CHUNKED else []
        partial = method_partial(m, n_t, [*extra, *args.override])
        if needs_ref(partial) and ref is None:
            ref = make_ref(policy)
        impl = partial(ref=ref if needs_ref(partial) else None)
        return impl, advantages(rewards, batch.group_size, std_adv(partial)).to(policy.device)

    for m in args.methods:
        chunk = min(args.gold_chunk, args.gold_mc)
        impl, adv = build(m, chunk)
        gold = torch.zeros(0)
        for k in range(args.gold_mc // chunk):
            bar.set_postfix_str(f"{m} gold {k * chunk}/{args.gold_mc}")
            g = gradient(policy, impl, adv, batch, seed=next(seeds))
            gold = g if k == 0 else gold + g
            bar.update(chunk)
        gold /= args.gold_mc // chunk
        golds[m] = gold
        for n in args.mcs:
            impl, adv = build(m, n)
            gs = []
            for r in range(args.repeats):
                bar.set_postfix_str(f"{m} n_t={n} repeat {r}")
                gs.append(gradient(policy, impl, adv, batch, seed=next(seeds)))
                bar.update(n)
            G_ = torch.stack(gs)  # [R, n_params]
            std = G_.std(0)  # per parameter, over repeats
            mean = G_.mean(0)
            gnorm = gold.norm().clamp(min=1e-300)
            rows.append({"kind": "grad", "method": m, "mc": n, "repeats": args.repeats,
                         "grad_std": std.mean().item(),
                         "grad_std_rel": (std.mean() / gold.abs().mean()).item(),
                         "bias_rel": ((mean - gold).norm() / gnorm).item(),
                         "dist_rel": ((G_ - gold).norm(dim=1) / gnorm).mean().item(),
                         "cos_mean_to_gold": _cos(mean, gold), "grad_norm_mean": G_.norm(dim=1).mean().item(),
                         "gold_mc": args.gold_mc})
            del G_, gs
    for m, gold in golds.items():
        row = {"kind": "gold", "method": m, "gold_mc": args.gold_mc, "gold_chunk": args.gold_chunk,
               "gold_norm": gold.norm().item(), "gold_abs_mean": gold.abs().mean().item()}
        if "bgpo" in golds:
            row["cos_vs_bgpo_gold"] = _cos(gold, golds["bgpo"])
        rows.append(row)
    if {"bgpo", "vrpo"} <= set(args.methods):  # docs/methods.md §3: on-policy, equal gradients on equal draws
        n = 4
        a = gradient(policy, *build("bgpo", n), batch=batch, seed=7)
        b = gradient(policy, *build("vrpo", n), batch=batch, seed=7)
        rows.append({"kind": "onpolicy_check", "method": "bgpo_vs_vrpo", "mc": n,
                     "rel_diff": ((a - b).norm() / a.norm().clamp(min=1e-300)).item()})
    return rows


# ---- Var(B̂_θ − B̂_old) ----------------------------------------------------------------------------
def perturbed(policy: DLLM, scale: float, seed: int) -> DLLM:
    """θ = θ_old + scale · RMS(tensor) · N(0, 1), tensor by tensor (a deterministic copy)."""
    theta = DLLM(**{**policy.__dict__, "net": copy.deepcopy(policy.net)})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theta.net.parameters():
            rms = p.detach().float().square().mean().sqrt().clamp(min=1e-3)
            p.add_((scale * rms * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return theta


def replicate_draws(batch: Batch, cfg: ELBOConfig, n: int, R: int, eos: int, g: torch.Generator) -> Draws:
    """R independent sets of n draws (stratified WITHIN each set), stacked: ``n_t = R·n``."""
    sets = [elbo.draw(batch, cfg, n, eos, g) for _ in range(R)]
    return Draws(torch.cat([d.masked for d in sets]), torch.cat([d.weight for d in sets]), sets[0].scored)


def diff_rows(args: argparse.Namespace, policy: DLLM, batch: Batch, bar: Any) -> list[dict[str, Any]]:
    k = min(args.diff_seqs, batch.input_ids.shape[0])
    sub = Batch(batch.input_ids[:k], batch.attention_mask[:k], batch.prompt_len, batch.group_size)
    theta = perturbed(policy, args.perturb, args.seed + 1)
    R, half = args.diff_replicates, args.diff_replicates // 2
    was = policy.net.training, theta.net.training
    policy.net.eval()
    theta.net.eval()
    rows = []
    configs = [(est, n) for est in ESTIMATORS for n in args.diff_ns]
    for i, ((level, stratified, t_min), n) in enumerate(configs):
        cfg = ELBOConfig(level=level, stratified=stratified, t_min=t_min)
        bar.set_postfix_str(f"B̂ diff {level} strat={stratified} t_min={t_min} n={n}")
        g = torch.Generator(device=policy.device).manual_seed(10**6 * (args.seed + 1) + i)
        d = replicate_draws(sub, cfg, n, R, policy.eos_token_id, g)
        chunk = max(1, 256 // k)
        b_theta = elbo.ell_all(theta, sub, d, chunk).double().view(R, n, k).mean(1)  # [R, k]
        b_old = elbo.ell_all(policy, sub, d, chunk).double().view(R, n, k).mean(1)  # [R, k]
        coupled = b_theta - b_old  # the same masks for θ and θ_old
        indep = b_theta[:half] - b_old[half : 2 * half]  # independent masks: R/2 pairs
        base = {"kind": "elbo_diff", "level": level, "stratified": stratified, "t_min": t_min, "n": n,
                "perturb": args.perturb, "seqs": k, "var_theta": b_theta.var(0).mean().item(),
                "mean_diff": coupled.mean().item()}
        rows.append({**base, "coupled": True, "replicates": R, "var": coupled.var(0).mean().item()})
        rows.append({**base, "coupled": False, "replicates": half, "var": indep.var(0).mean().item()})
        bar.update(2 * R * n)
    for i, (level, stratified, t_min) in enumerate(ESTIMATORS):  # single-draw tails (n = 1)
        cfg = ELBOConfig(level=level, stratified=stratified, t_min=t_min)
        g = torch.Generator(device=policy.device).manual_seed(10**7 * (args.seed + 1) + i)
        d = replicate_draws(sub, cfg, 1, args.tail_draws, policy.eos_token_id, g)
        ell = elbo.ell_all(policy, sub, d, max(1, 256 // k)).double()  # [D, k]
        dev = (ell - ell.mean(0)).square()  # [D, k]
        top = max(1, args.tail_draws // 1000)
        rows.append({"kind": "estimator", "level": level, "stratified": stratified, "t_min": t_min,
                     "draws": args.tail_draws, "seqs": k, "var_ell": dev.mean(0).mean().item(),
                     "max_weight": d.weight.max().item(), "max_abs_dev_sd": (dev.max(0).values / dev.mean(0))
                     .sqrt().mean().item(), "top_share": (dev.topk(top, 0).values.sum(0) / dev.sum(0))
                     .mean().item(), "mean_ell": ell.mean().item()})
        bar.update(args.tail_draws)
    policy.net.train(was[0])
    theta.net.train(was[1])
    return rows


# the estimator options compared (level, stratified, t_min); docs/methods.md §2 and paper/NOTES.md
ESTIMATORS = (("time", False, 0.0), ("time", True, 0.0), ("time", False, 1e-3), ("count", False, 0.0),
              ("count", True, 0.0))


def run(args: argparse.Namespace, cmd: str) -> tuple[Path, list[dict[str, Any]]]:
    import time

    from tqdm.auto import tqdm

    spec: ModelSpec = model_spec(args.model, args.arch, args.name, args.dtype, args.device, 0, args.seed,
                                 args.task)
    torch.manual_seed(args.seed)
    policy = load_model(spec)
    t0 = time.time()
    batch, rewards, synthetic = fixed_batch(policy, args.task, args.prompts, args.group, args.temperature,
                                            args.seed, args.max_tries)
    total = (len(args.methods) * (args.gold_mc + args.repeats * sum(args.mcs))
             + len(ESTIMATORS) * (2 * args.diff_replicates * sum(args.diff_ns) + args.tail_draws))
    bar = tqdm(total=total, disable=not args.progress, desc=f"variance {spec.name}", unit="draw")
    rows = grad_rows(args, policy, batch, rewards, bar) + diff_rows(args, policy, batch, bar)
    bar.close()
    meta = {**common_meta(spec, cmd), "task": args.task, "prompts": args.prompts, "group_size": args.group,
            "temperature": args.temperature, "synthetic_reward_groups": synthetic,
            "rewards": rewards.tolist(), "batch_sequences": batch.input_ids.shape[0],
            "prompt_length": batch.prompt_len, "gen_length": batch.completion.shape[1],
            "overrides": args.override, "wall_s": round(time.time() - t0, 1)}
    rows = [{**r, **meta} for r in rows]
    path = Path(args.out) / f"variance-{spec.name}.jsonl"
    write_rows(path, rows)
    return path, rows


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for m in GRAD_METHODS:
        g = sorted((r for r in rows if r["kind"] == "grad" and r["method"] == m), key=lambda r: r["mc"])
        if g:
            out.append(f"{m:10s} grad_std " + " ".join(f"{r['mc']}:{r['grad_std']:.3g}" for r in g)
                       + " | bias_rel " + " ".join(f"{r['mc']}:{r['bias_rel']:.3f}" for r in g))
    for r in rows:
        if r["kind"] == "gold":
            out.append(f"gold {r['method']}: |g|={r['gold_norm']:.4g} "
                       f"cos(bgpo gold)={r.get('cos_vs_bgpo_gold')}")
        if r["kind"] == "onpolicy_check":
            out.append(f"on-policy BGPO vs VRPO-OL gradient, same draws: rel diff {r['rel_diff']:.2e}")
    d = [r for r in rows if r["kind"] == "elbo_diff"]
    for level, strat, t_min in ESTIMATORS:
        for coupled in (False, True):
            sel = sorted((r for r in d if r["coupled"] == coupled
                          and (r["level"], r["stratified"], r.get("t_min", 0.0)) == (level, strat, t_min)),
                         key=lambda r: r["n"])
            if sel:
                out.append(f"Var(B̂θ−B̂old) {level:5s} {'strat' if strat else 'iid  '} t_min={t_min:g} "
                           f"{'coupled' if coupled else 'indep  '}: "
                           + " ".join(f"n={r['n']}:{r['var']:.4g}" for r in sel))
    for r in rows:
        if r["kind"] == "estimator":
            iid = "strat" if r["stratified"] else "iid  "
            out.append(f"ℓ tails {r['level']:5s} {iid} t_min={r['t_min']:g}: "
                       f"var {r['var_ell']:.4g}, max weight {r['max_weight']:.4g}, largest |ℓ−mean| "
                       f"{r['max_abs_dev_sd']:.1f} sd, top 0.1% of draws hold {100 * r['top_share']:.1f}% "
                       "of the sum of squares")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return bench_main("variance", argv, parse, run, summary)


if __name__ == "__main__":
    sys.exit(main())
