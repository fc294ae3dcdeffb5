"""The suite's dLLMs as an lm-evaluation-harness model: ``bgpo_dllm`` (issue 6).

Importing this module registers ``bgpo_dllm`` with lm-eval. lm-eval 0.4.13 reads no entry points
for models, so the CLI needs the import first: ``python -m bgpo.lm_eval_cli`` (same arguments as
``lm_eval``; it also puts the suite's tasks on ``--include_path``). From Python::

    import bgpo.lm_eval_model  # registers bgpo_dllm
    lm_eval.simple_evaluate(model="bgpo_dllm", model_args="pretrained=PATH,mc_num=64", tasks=[...])

or pass an instance: ``simple_evaluate(model=BGPODLLM(model=dllm, ...), ...)``.
``evaluate_suite_task`` is that path for an in-memory ``DLLM`` (the trainer's periodic evaluation).

model_args (all optional but ``pretrained``; an unknown one is an error naming the allowed ones):

- ``pretrained``: model folder or hub name; ``kind``: tiny | llada | dream | auto (default: from
  the folder's ``config.json`` ``model_type``, or the hub name); ``dtype``, ``mask_token_id``;
  ``remote_code`` (default False: LLaDA / Dream load into the suite's native classes; True: the
  checkpoint's published modeling code, as ``model.remote_code``; lm-eval's own
  ``--trust_remote_code`` does not switch it); ``revision`` (hub branch, tag or commit) and
  ``trust_remote_code`` (lm-eval's ``--trust_remote_code`` sets it: may a tokenizer that ships as
  code run) go to ``bgpo.model.load_dllm``;
  the device is lm-eval's ``--device`` / ``device=`` (``auto``: cuda when available; lm-eval's CLI
  passes ``cuda:0`` by default, which falls back to the CPU without CUDA) — on the CLI do not put
  ``device`` in ``--model_args`` as well (lm-eval then passes it twice);
- ``use_chat_template``: wrap each context as one user turn (``DLLM.format_prompt``, what the
  suite's rollouts do). lm-eval's own ``--apply_chat_template`` also works (it calls
  ``apply_chat_template`` below); use one or the other, not both;
- generation: ``gen_length``, ``block_length``, ``steps``, ``temperature``, ``seed``. A value given
  here wins for every task; otherwise the request's ``generation_kwargs`` (the suite's task YAMLs
  set the suite's lengths, one token per step), then ``max_gen_toks`` for ``gen_length``, then
  the defaults 256 / 32 / gen_length / 0.0. Requests are generated in their order, in batches of
  ``batch_size`` (so outputs match ``bgpo.rollout.evaluate`` batch for batch), EOS ends a
  completion, and every ``until`` string cuts it at its first occurrence;
- log-likelihood: ``mc_num`` (Monte Carlo samples of the ELBO per request, default 128),
  ``mc_batch`` (sequences per forward pass, default 32), ``greedy_check`` (default True).

``loglikelihood`` is the ELBO of the shared sampler (``bgpo.elbo``): ``level="count"`` (mask
exactly l ~ U{1..L} of the L continuation tokens, weight L/l, as LLaDA's evaluation),
``window="full"`` (every continuation token is scored), averaged over ``mc_num`` draws. The draws
of a request are seeded from ``(seed, context, continuation)`` (``request_seed``), so a request
gets the same masks whatever else is in its batch (its value then agrees to float rounding).
``is_greedy`` is a one-step check: with the whole continuation masked, does one forward pass
predict every continuation token as its argmax? (The multi-step sampler could differ; the check
is exact for a one-token continuation; ``greedy_check=False`` returns False without the extra
forward pass.)
``loglikelihood_rolling`` raises ``NotImplementedError``: a masked diffusion LM has no
left-to-right factorisation, so perplexity tasks have nothing exact to compute.

Data parallel. Under ``torchrun --nproc_per_node N -m bgpo.lm_eval_cli ...`` (or ``accelerate
launch``), a model loaded from ``pretrained`` joins the process group (``bgpo.parallel.Dist``:
accelerate, gloo on CPU, NCCL on ``cuda:<local rank>``) and reports its ``rank`` / ``world_size``
to lm-eval (0.4.13), which gives each rank every N-th document, pads the ranks to equal request
counts, and gathers the per-sample metrics and logged samples on rank 0 (``all_gather``,
``gather_object``, ``barrier`` below); rank 0 prints and writes the results. Greedy generation
and the log-likelihood draws (seeded per request) do not depend on which rank serves a request,
so rank 0 reports what one process reports (tested with 2 gloo processes); sampled generation
(temperature > 0) draws from one generator per rank and batch. A model passed in memory
(``from_dllm``, the trainer's rank-0 evaluation) stays a single process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in models stay registered next to ours)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from bgpo.elbo import Batch, Draws, ELBOConfig, draw, ell_all
from bgpo.lm_eval_tasks import TASKS_DIR, lm_task_name
from bgpo.model import DLLM, load_dllm
from bgpo.parallel import Dist
from bgpo.sampler import SamplerConfig, generate

MODEL_NAME = "bgpo_dllm"
DEFAULT_GEN_LENGTH, DEFAULT_BLOCK_LENGTH = 256, 32
ELBO = ELBOConfig(mode="elbo", level="count", window="full")
"""The log-likelihood estimator: exactly l ~ U{1..L} masked tokens, weight L/l, all tokens scored."""

log = logging.getLogger(__name__)


def detect_kind(pretrained: str | Path) -> str:
    """tiny / llada / dream from a folder's ``config.json`` (``model_type``) or a hub name."""
    cfg = Path(pretrained) / "config.json"
    name = json.loads(cfg.read_text()).get("model_type", "") if cfg.is_file() else str(pretrained)
    name = name.lower()
    if "llada" in name:
        return "llada"
    if "dream" in name:
        return "dream"
    if cfg.is_file():
        return "tiny"
    raise ValueError(f"kind=auto cannot tell the kind of {pretrained!r}: pass kind=tiny|llada|dream")


def request_seed(seed: int, context: str, continuation: str) -> int:
    """The seed of one log-likelihood request's MC draws (stable across processes and batches)."""
    blob = f"{seed}\x00{context}\x00{continuation}".encode()
    return int(hashlib.sha256(blob).hexdigest()[:15], 16)


def truncate_at_stops(text: str, until: str | Sequence[str] | None) -> str:
    """``text`` up to the earliest occurrence of any stop string (empty strings ignored)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


def _opt_bool(v: Any) -> bool | None:
    return None if v is None or v in ("", "None", "none", "null") else _as_bool(v)


def _opt(v: Any, cast: type) -> Any:
    return None if v is None or v in ("", "None", "none", "null") else cast(v)


def model_arg_names() -> list[str]:
    """The model_args ``bgpo_dllm`` accepts (its constructor's keywords, minus ``model``)."""
    import inspect

    params = inspect.signature(BGPODLLM.__init__).parameters
    return sorted(k for k, p in params.items()
                  if k not in ("self", "model") and p.kind is p.POSITIONAL_OR_KEYWORD)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


@register_model(MODEL_NAME)
class BGPODLLM(LM):
    """lm-eval model over the suite's ``DLLM`` adapter, rollout sampler and ELBO sampler."""

    def __init__(self, pretrained: str | None = None, kind: str = "auto", dtype: str = "float32",
                 device: str | None = None, mask_token_id: int | None = None,
                 use_chat_template: bool = False, remote_code: bool = False, gen_length: int | None = None,
                 block_length: int | None = None, steps: int | None = None,
                 temperature: float | None = None, seed: int = 0, mc_num: int = 128, mc_batch: int = 32,
                 greedy_check: bool = True, batch_size: int | str = 32, max_batch_size: int | None = None,
                 progress: bool = True, revision: str | None = None, trust_remote_code: bool | None = None,
                 model: DLLM | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; "
                             f"allowed: {model_arg_names()}")
        if model is None:
            if not pretrained:
                raise ValueError(f"{MODEL_NAME}: model_args must name pretrained=<model folder or hub name>")
            if device in (None, "", "auto"):
                device = "cuda" if torch.cuda.is_available() else "cpu"
            elif str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("%s: device=%s but CUDA is not available: using the CPU", MODEL_NAME, device)
                device = "cpu"  # lm-eval's CLI passes cuda:0 when --device is not given
            dist = Dist.from_env("cpu" if str(device) == "cpu" else "cuda")  # torchrun: join the group
            if dist.world > 1:
                device = dist.device
                self._rank, self._world_size = dist.rank, dist.world
            kind = detect_kind(pretrained) if kind == "auto" else kind
            model = load_dllm(kind, pretrained, dtype=dtype, device=device,
                              mask_token_id=_opt(mask_token_id, int),
                              use_chat_template=_as_bool(use_chat_template),
                              remote_code=_as_bool(remote_code), revision=_opt(revision, str),
                              trust_remote_code=_opt_bool(trust_remote_code))
            model.net.eval()
        self.model = model
        self.pretrained = str(pretrained) if pretrained else None
        self._device = model.device
        # explicit generation settings (None: the request's generation_kwargs, then defaults)
        self.gen_length, self.block_length = _opt(gen_length, int), _opt(block_length, int)
        self.steps, self.temperature = _opt(steps, int), _opt(temperature, float)
        self.seed = int(seed)
        self.mc_num, self.mc_batch = int(mc_num), int(mc_batch)
        if self.mc_num < 1 or self.mc_batch < 1:
            raise ValueError(f"{MODEL_NAME}: mc_num={mc_num} and mc_batch={mc_batch} must be >= 1")
        self.greedy_check = _as_bool(greedy_check)
        self.progress = _as_bool(progress) and self._rank == 0
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 32  # no memory probing: a fixed batch (set batch_size=N to change it)
        self.batch_size = max(1, int(batch_size))
        if self.gen_length is not None and self.block_length is not None:
            self.sampler_config({})  # fail at start-up on a bad explicit schedule

    @classmethod
    def from_dllm(cls, model: DLLM, **kwargs: Any) -> BGPODLLM:
        """Wrap an in-memory ``DLLM`` (e.g. the policy being trained); kwargs as the model_args."""
        return cls(model=model, **kwargs)

    # ---- generation -------------------------------------------------------------------------
    def sampler_config(self, gen_kwargs: dict[str, Any]) -> SamplerConfig:
        """Explicit model_args, else the request's generation_kwargs, else the defaults."""
        def pick(name: str, explicit: Any) -> Any:
            return explicit if explicit is not None else gen_kwargs.get(name)

        gen_length = pick("gen_length", self.gen_length)
        from_max_toks = gen_length is None and gen_kwargs.get("max_gen_toks") is not None
        if gen_length is None:
            gen_length = gen_kwargs.get("max_gen_toks") or DEFAULT_GEN_LENGTH
        gen_length = int(gen_length)
        block_length = int(pick("block_length", self.block_length) or min(DEFAULT_BLOCK_LENGTH, gen_length))
        if from_max_toks and gen_length % block_length:  # round lm-eval's budget up to whole blocks
            gen_length += block_length - gen_length % block_length
        steps = int(pick("steps", self.steps) or gen_length)
        temperature = pick("temperature", self.temperature)
        if gen_kwargs.get("do_sample") is False and self.temperature is None:
            temperature = 0.0
        return SamplerConfig(gen_length, block_length, steps, float(temperature or 0.0))

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[SamplerConfig, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self.sampler_config(dict(req.args[1] or {})), []).append(i)
        bar = tqdm(total=len(requests), desc=f"{MODEL_NAME} generate",
                   disable=disable_tqdm or not self.progress, leave=False)
        was_training = self.model.net.training
        self.model.net.eval()
        try:
            for cfg, idxs in groups.items():
                gen = None
                if cfg.temperature > 0:
                    gen = torch.Generator(device=self._device).manual_seed(self.seed)
                for chunk in _chunks(idxs, self.batch_size):
                    contexts = [requests[i].args[0] for i in chunk]
                    prompt_ids, prompt_mask = self.model.encode_prompts(contexts)
                    comp = generate(self.model, prompt_ids, prompt_mask, cfg, gen)  # [b, L]
                    for i, text in zip(chunk, self.model.decode_completions(comp), strict=True):
                        text = truncate_at_stops(text, (requests[i].args[1] or {}).get("until"))
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        finally:
            self.model.net.train(was_training)
            bar.close()
        return out  # type: ignore[return-value]

    # ---- log-likelihood ---------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt and continuation token ids (trailing context spaces move to the continuation,
        as lm-eval's HF model does; with the chat template the context is one user turn)."""
        tok = self.model.tokenizer
        if self.model.use_chat_template:
            prompt = tok(self.model.format_prompt(context), add_special_tokens=False)["input_ids"]
            return prompt, tok(continuation, add_special_tokens=False)["input_ids"]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        prompt = tok(context, add_special_tokens=False)["input_ids"] if context else []
        return prompt, whole[len(prompt) :]

    def make_batch(self, pairs: list[tuple[list[int], list[int]]]) -> Batch:
        """Left-padded prompts + continuations of one length: a ``Batch`` of G=1 groups."""
        P = max(len(p) for p, _ in pairs)
        pad = self.model.pad_token_id
        ids = torch.tensor([[pad] * (P - len(p)) + p for p, _ in pairs], dtype=torch.long).view(len(pairs), P)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _ in pairs], dtype=torch.long)
        comp = torch.tensor([c for _, c in pairs], dtype=torch.long)
        return Batch.build(ids.to(self._device), mask.view(len(pairs), P).to(self._device),
                           comp.to(self._device), 1)

    def draws(self, batch: Batch, seeds: list[int]) -> Draws:
        """mc_num draws per row, each row from its own seeded generator (batch-independent)."""
        parts = []
        for i, s in enumerate(seeds):
            row = Batch(batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1], batch.prompt_len, 1)
            g = torch.Generator(device=batch.input_ids.device).manual_seed(s)
            parts.append(draw(row, ELBO, self.mc_num, self.model.eos_token_id, g))
        return Draws(torch.cat([d.masked for d in parts], 1), torch.cat([d.weight for d in parts], 1),
                     torch.cat([d.scored for d in parts], 0))

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], seeds: list[int]) -> list[tuple[float, bool]]:
        """ELBO estimate and one-step greedy check for requests whose continuations share a length."""
        batch = self.make_batch(pairs)
        ell = ell_all(self.model, batch, self.draws(batch, seeds), max(1, self.mc_batch // len(pairs)))
        ll = ell.double().mean(0)  # [b]: mean over the mc_num draws
        if self.greedy_check:
            x = batch.input_ids.clone()
            x[:, batch.prompt_len :] = self.model.mask_token_id
            pred = self.model.logits(x, batch.attention_mask)[:, batch.prompt_len :].argmax(-1)
            greedy = (pred == batch.completion).all(-1).tolist()
        else:
            greedy = [False] * len(pairs)
        return [(float(v), bool(gr)) for v, gr in zip(ll.tolist(), greedy, strict=True)]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(req.args) for req in requests]
        pairs = [self.encode_pair(ctx, cont) for ctx, cont in args]
        seeds = [request_seed(self.seed, ctx, cont) for ctx, cont in args]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        by_len: dict[int, list[int]] = {}
        for i, (_, cont) in enumerate(pairs):
            by_len.setdefault(len(cont), []).append(i)
        bar = tqdm(total=len(requests), desc=f"{MODEL_NAME} loglikelihood",
                   disable=disable_tqdm or not self.progress, leave=False)
        was_training = self.model.net.training
        self.model.net.eval()
        try:
            for L, idxs in by_len.items():
                for chunk in _chunks(idxs, self.batch_size):
                    res = [(0.0, True)] * len(chunk) if L == 0 else \
                        self.score([pairs[i] for i in chunk], [seeds[i] for i in chunk])
                    for i, r in zip(chunk, res, strict=True):
                        out[i] = r
                        self.cache_hook.add_partial("loglikelihood", args[i], r)
                    bar.update(len(chunk))
        finally:
            self.model.net.train(was_training)
            bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            f"{MODEL_NAME}: loglikelihood_rolling (perplexity tasks) is not supported: a masked diffusion "
            "LM has no left-to-right factorisation, so there is no exact rolling log-likelihood; only an "
            "ELBO bound of a whole text (use loglikelihood tasks or generate_until tasks instead)"
        )

    # ---- data parallel: what lm-eval's evaluator calls when world_size > 1 --------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensors of all ranks, concatenated along dim 0 (a scalar counts as one element)."""
        if self._world_size <= 1:
            return tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.zeros_like(t) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (None elsewhere)."""
        if self._world_size <= 1:
            return [obj]
        out: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # ---- chat template and provenance -------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.model.tokenizer, "name_or_path", "") or self.model.kind).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.model.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        return {"bgpo_kind": self.model.kind, "bgpo_pretrained": self.pretrained, "mc_num": self.mc_num,
                "use_chat_template": self.model.use_chat_template}


# ---- the suite's tasks through lm-eval ------------------------------------------------------
@contextlib.contextmanager
def _keep_global_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states afterwards (lm-eval and datasets
    draw from Python's ``random`` while loading a task; a training run must not see it)."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """Silence lm-eval's per-run log lines and its request-building progress bar (e.g. inside a
    training loop)."""
    if not quiet:
        yield
        return
    import lm_eval.api.task as lm_task

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, lm_task.tqdm
    logger.setLevel(logging.ERROR)
    lm_task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_task.tqdm = bar


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def suite_task_metadata(task_cfg: Any, n: int | None = None) -> dict[str, Any]:
    """TaskManager metadata for a suite task config (``bgpo.config.TaskConfig``-like)."""
    options = _get(task_cfg, "options") or {}
    if not isinstance(options, dict):  # DictConfig
        from omegaconf import OmegaConf

        options = OmegaConf.to_container(options, resolve=True)
    return {"bgpo_format": _get(task_cfg, "format", "compact"), "bgpo_test_file": _get(task_cfg, "test_file"),
            "bgpo_n_test": _get(task_cfg, "n_test"), "bgpo_n": n, "bgpo_options": json.dumps(options),
            "bgpo_shots": _get(task_cfg, "shots", 0) or 0}


def evaluate_suite_task(model: DLLM | LM, task_name: str, task_cfg: Any = None, n: int | None = None,
                        *, source: str = "own", batch_size: int = 64, steps: int | None = None,
                        temperature: float = 0.0, log_samples: bool = False, per_problem: bool = False,
                        quiet: bool = True) -> dict[str, Any]:
    """Greedy evaluation of a suite task through lm-eval with ``bgpo_dllm``: the first ``n``
    problems of the test set ``task_cfg`` selects (``test_file``, ``n_test``, ``options``, ``format``;
    ``source="d1"``: d1's test file). Sampler: ``task_cfg.gen_length`` / ``block_length`` with
    ``steps`` = gen_length (one token per step, as ``bgpo.rollout.evaluate``).

    Returns ``{"accuracy", "reward", "n"}`` (the keys of ``bgpo.rollout.evaluate``), plus
    ``"completions"`` (in test-set order) when ``log_samples``, and ``"per_problem"`` —
    ``{"accuracy": [...], "reward": [...]}`` in test-set order, what paired intervals need — when
    ``per_problem``. ``source="val"`` evaluates the validation set. Touches no global RNG state and
    restores the model's train/eval mode. ``model`` may also be a ready lm-eval ``LM`` such as a
    ``BGPODLLM`` (its own sampler settings then apply).
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(model, LM):
        lm = model
    else:
        gen_length = int(_get(task_cfg, "gen_length", 0) or 0) or None
        block_length = int(_get(task_cfg, "block_length", 0) or 0) or None
        lm = BGPODLLM.from_dllm(model, gen_length=gen_length, block_length=block_length,
                                steps=steps or gen_length, temperature=temperature, batch_size=batch_size,
                                progress=False)
    name = lm_task_name(task_name, source)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata=suite_task_metadata(task_cfg, n))
    with _quiet_lm_eval(quiet), _keep_global_rng():
        # lm-eval's evaluate(), as simple_evaluate calls it, minus simple_evaluate's extras: it
        # re-seeds the global RNGs (which would change a training run) and collects environment
        # info and the git hash (~1 s of subprocesses per call)
        res = evaluate(lm=lm, task_dict=tm.load([name]), bootstrap_iters=0,
                       log_samples=log_samples or per_problem)
    assert res is not None  # single process: rank 0
    m = res["results"][name]  # numpy floats: cast for JSON
    out: dict[str, Any] = {"accuracy": float(m["accuracy,none"]), "reward": float(m["reward,none"]),
                           "n": int(res["n-samples"][name]["effective"])}
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"]) if log_samples or per_problem else []
    if log_samples:
        out["completions"] = [s["resps"][0][0] for s in samples]
    if per_problem:
        out["per_problem"] = {k: [float(s[k]) for s in samples] for k in ("accuracy", "reward")}
    return out
