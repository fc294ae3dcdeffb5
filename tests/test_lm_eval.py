"""lm-evaluation-harness integration (issue 6): the ``bgpo_dllm`` model, the suite's task YAMLs,
``bgpo.evaluate`` and the CLI wrapper, on a micro model saved to a temporary folder."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

import bgpo.evaluate as bgpo_evaluate
from bgpo.config import TaskConfig
from bgpo.elbo import Batch, draw, ell_all
from bgpo.lm_eval_model import BGPODLLM, ELBO, evaluate_suite_task, request_seed, truncate_at_stops
from bgpo.lm_eval_tasks import TASKS_DIR, lm_task_name, process_results, suite_rows
from bgpo.rollout import evaluate, rollout
from bgpo.tasks import d1_data_dir, get_task
from tests.helpers import micro_model, perturb

N = 8  # problems per task: enough to cover prompts of different lengths (left padding)
TASK_CFG = {  # bgpo/conf/task/*.yaml
    "countdown": TaskConfig(name="countdown", gen_length=16, block_length=8, diffusion_steps=16),
    "sudoku": TaskConfig(name="sudoku", gen_length=17, block_length=17, diffusion_steps=17),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on two shared cores spin against each other (10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def micro_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


@pytest.fixture(scope="module")
def micro():
    return micro_model(dtype=torch.float32)


def suite_reference(model, name: str, n: int = N) -> tuple[dict, list[str]]:
    """What the suite itself reports (bgpo.rollout.evaluate) and the greedy completions."""
    task = get_task(name)
    exs = task.test_examples()[:n]
    ref = evaluate(model, task, exs, TASK_CFG[name])
    texts = rollout(model, task, exs, TASK_CFG[name], 1, 0.0, eval_mode=True).texts
    return ref, texts


def suite_score(name: str, texts: list[str]) -> tuple[float, float]:
    """Accuracy and mean reward by the task's own code, completions given in test-set order."""
    task = get_task(name)
    exs = task.test_examples()[: len(texts)]
    pairs = list(zip(exs, texts, strict=True))
    return (sum(task.correct(e, t, "compact") for e, t in pairs) / len(pairs),
            sum(task.reward(e, t, "compact") for e, t in pairs) / len(pairs))


def req(context: str, arg, kind: str = "generate_until", idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=(context, arg), idx=idx)


# ---- bgpo.evaluate: lm-eval's accuracy == the suite's accuracy on the same generations ----------
@pytest.mark.parametrize("name", ["countdown", "sudoku"])
def test_evaluate_entry_equals_suite_reward(name, micro_path, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bgpo.evaluate")
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={micro_path}", f"task={name}", f"n={N}",
                                             f"out={tmp_path}", "log_samples=true", "device=cpu"])
    entry = bgpo_evaluate.run(cfg)
    printed = caplog.text  # the result line (console and job log under Hydra)
    model = micro_model(dtype=torch.float32)
    ref, texts = suite_reference(model, name)
    assert entry["completions"] == texts  # the same generations, problem by problem
    assert entry["accuracy"] == ref["accuracy"] and entry["n"] == ref["n"] == N
    assert entry["reward"] == pytest.approx(ref["reward"], abs=1e-12)
    assert (ref["accuracy"], ref["reward"]) == pytest.approx(suite_score(name, texts))
    assert f"accuracy {ref['accuracy']:.4f}" in printed and lm_task_name(name) in printed
    stored = json.loads((tmp_path / "eval.json").read_text())[lm_task_name(name)]
    assert stored["accuracy"] == ref["accuracy"] and stored["sampler"]["steps"] == TASK_CFG[name].gen_length


def test_metric_is_the_suite_reward_with_a_scripted_model():
    """A model answering half the problems correctly: lm-eval's accuracy is exactly 1/2 (the random
    micro model scores 0 everywhere, so this checks that correct answers are counted)."""

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [r.doc["solution"] if r.doc["doc_index"] % 2 == 0 else "1+" for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    for name in ("countdown", "sudoku"):
        res = evaluate_suite_task(Scripted(), name, TASK_CFG[name], n=N)
        exs = get_task(name).test_examples()[:N]
        acc, reward = suite_score(name, [e.solution if i % 2 == 0 else "1+" for i, e in enumerate(exs)])
        assert res["accuracy"] == acc == 0.5 and res["reward"] == pytest.approx(reward)


def test_process_results_uses_task_reward():
    for name in ("countdown", "sudoku"):
        task = get_task(name)
        for doc, ex in zip(suite_rows(name, n=4), task.test_examples()[:4], strict=True):
            assert doc["prompt"] == task.render(ex, "compact")
            assert process_results(doc, [ex.solution]) == {"accuracy": 1.0, "reward": 1.0}
            wrong = "0" * 16
            assert process_results(doc, [wrong])["reward"] == task.reward(ex, wrong, "compact")


# ---- the trainer's entry: an in-memory DLLM -------------------------------------------------------
def test_evaluate_suite_task_in_memory(micro):
    ref, _ = suite_reference(micro, "countdown")
    micro.net.train()
    states = torch.get_rng_state(), random.getstate()
    res = evaluate_suite_task(micro, "countdown", TASK_CFG["countdown"], n=N)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert micro.net.training  # mode restored
    micro.net.eval()
    assert res == {"accuracy": ref["accuracy"], "reward": pytest.approx(ref["reward"], abs=1e-12), "n": N}


# ---- generate_until ------------------------------------------------------------------------------
def test_truncate_at_stops():
    assert truncate_at_stops("12+3|45\n6", ["\n", "|"]) == "12+3"
    assert truncate_at_stops("abc", "c") == "ab" and truncate_at_stops("abc", ["", "x"]) == "abc"
    assert truncate_at_stops("abc", None) == "abc"


def test_generate_until_honours_stop_strings(micro):
    lm = BGPODLLM.from_dllm(micro, gen_length=16, block_length=8, progress=False)
    prompts = ["12,3,4=7|", "5,6,70=1|"]
    free = lm.generate_until([req(p, {"until": []}) for p in prompts])
    assert all(free), free  # the random micro model writes something
    stops = [t[len(t) // 2] for t in free]
    cut = lm.generate_until([req(p, {"until": [s, "never"]}) for p, s in zip(prompts, stops, strict=True)])
    assert cut == [t[: t.index(s)] for t, s in zip(free, stops, strict=True)]
    # the completions are the sampler's, decoded by the adapter
    ids, mask = micro.encode_prompts(prompts)
    from bgpo.sampler import SamplerConfig, generate

    assert free == micro.decode_completions(generate(micro, ids, mask, SamplerConfig(16, 8, 16, 0.0)))


def test_sampler_settings_precedence(micro):
    lm = BGPODLLM.from_dllm(micro, progress=False)
    assert lm.sampler_config({"gen_length": 24, "block_length": 8}) == lm.sampler_config(
        {"gen_length": 24, "block_length": 8, "steps": 24, "temperature": 0.0})
    assert lm.sampler_config({"max_gen_toks": 20, "block_length": 8}).gen_length == 24  # whole blocks
    pinned = BGPODLLM.from_dllm(micro, gen_length=16, block_length=4, steps=8, temperature=0.5)
    cfg = pinned.sampler_config({"gen_length": 24, "block_length": 8, "temperature": 0.0})
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.temperature) == (16, 4, 8, 0.5)


# ---- loglikelihood through the shared ELBO sampler -------------------------------------------------
def test_loglikelihood_matches_hand_elbo(micro):
    lm = BGPODLLM.from_dllm(micro, mc_num=8, mc_batch=8, seed=3, progress=False)
    ctx, cont = "12,3,4=", "7|3+4"
    (ll, greedy), = lm.loglikelihood([req(ctx, cont, "loglikelihood")])
    # by hand: prompt then continuation, count levels (L/l weights), mean of the MC terms
    ids, mask = micro.encode_prompts([ctx])
    comp = torch.tensor([micro.tokenizer(cont, add_special_tokens=False)["input_ids"]])
    batch = Batch.build(ids, mask, comp, 1)
    g = torch.Generator().manual_seed(request_seed(3, ctx, cont))
    draws = draw(batch, ELBO, 8, micro.eos_token_id, g)
    hand = ell_all(micro, batch, draws, 8).double().mean().item()
    assert ELBO.level == "count" and ELBO.window == "full"
    assert math.isfinite(ll) and ll < 0 and ll == pytest.approx(hand, rel=1e-6)
    assert isinstance(greedy, bool)


def test_loglikelihood_deterministic_and_batch_independent(micro):
    pairs = [("12,3,4=", "7|"), ("5,6=", "11"), ("1,2,3=6|", "1+2"), ("", "abc"), ("9=", "")]
    reqs = [req(c, x, "loglikelihood", i) for i, (c, x) in enumerate(pairs)]
    lm = BGPODLLM.from_dllm(micro, mc_num=4, seed=0, progress=False)
    a, b = lm.loglikelihood(reqs), lm.loglikelihood(reqs)
    assert a == b and all(math.isfinite(v) for v, _ in a) and a[-1] == (0.0, True)
    alone = [lm.loglikelihood([r])[0][0] for r in reqs[:3]]  # one request per batch
    assert [v for v, _ in a[:3]] == pytest.approx(alone, rel=1e-5)
    other_seed = BGPODLLM.from_dllm(micro, mc_num=4, seed=1, progress=False).loglikelihood(reqs)
    assert [v for v, _ in other_seed[:3]] != [v for v, _ in a[:3]]


def test_greedy_check_is_one_step_argmax(micro):
    lm = BGPODLLM.from_dllm(micro, mc_num=1, progress=False)
    ids, mask = micro.encode_prompts(["12,3="])
    x = torch.cat([ids, torch.full((1, 2), micro.mask_token_id)], 1)
    attn = torch.cat([mask, torch.ones(1, 2, dtype=mask.dtype)], 1)
    best = micro.tokenizer.decode(micro.logits(x, attn)[0, -2:].argmax(-1))
    (_, g1), (_, g2) = lm.loglikelihood([req("12,3=", best, "loglikelihood"),
                                         req("12,3=", "~~" if best != "~~" else "}}", "loglikelihood")])
    assert (g1, g2) == (True, False)


def test_loglikelihood_rolling_is_not_supported(micro):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        BGPODLLM.from_dllm(micro).loglikelihood_rolling([req("text", None, "loglikelihood_rolling")])


# ---- tasks, data sources, Python API ---------------------------------------------------------------
def test_task_yamls_match_the_suite_configs():
    conf = Path(bgpo_evaluate.__file__).parent / "conf" / "task"
    names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    assert names == ["bgpo_countdown", "bgpo_countdown_d1", "bgpo_countdown_val", "bgpo_sudoku",
                     "bgpo_sudoku_d1", "bgpo_sudoku_val"]
    for p in TASKS_DIR.glob("*.yaml"):
        text = p.read_text().replace("!function ", "")
        spec = yaml.safe_load(text)
        suite = yaml.safe_load((conf / f"{spec['dataset_kwargs']['bgpo_task']}.yaml").read_text())
        gk = spec["generation_kwargs"]
        assert (gk["gen_length"], gk["block_length"], gk["steps"]) == (
            suite["gen_length"], suite["block_length"], suite["gen_length"])
        assert gk["until"] == [] and gk["temperature"] == 0.0


def test_data_sources(tmp_path, monkeypatch):
    d1 = d1_data_dir()
    if d1 is None or not (d1 / "countdown_cd3_test_d1.jsonl").is_file():
        pytest.skip("d1 data folder not available")
    for name, file in (("countdown", "countdown_cd3_test_d1.jsonl"), ("sudoku", "sudoku_4x4_test_d1.csv")):
        ref = get_task(name, test_file=str(d1 / file), n_test=5).test_examples()
        rows = suite_rows(name, "d1", n_test=5)
        assert [json.loads(r["fields"]) for r in rows] == [e.fields for e in ref]
        val = [json.loads(r["fields"]) for r in suite_rows(name, "val", n=5)]
        assert val == [e.fields for e in get_task(name).val_examples()[:5]]  # the validation set
    # a relative test file is taken against the current directory, then made absolute
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cd.jsonl").write_text('{"input": "1,2,3", "output": "6"}\n')
    monkeypatch.chdir(tmp_path)
    rows = suite_rows("countdown", test_file="data/cd.jsonl")
    assert [json.loads(r["fields"]) for r in rows] == [{"numbers": [1, 2, 3], "target": 6}]
    assert rows[0]["prompt"] == "1,2,3=6|"
    with pytest.raises(FileNotFoundError, match="bgpo_test_file"):
        suite_rows("countdown", test_file="data/missing.jsonl")


def test_simple_evaluate_by_name(micro_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"bgpo_n": 2})
    assert {"bgpo_countdown", "bgpo_sudoku_d1"} <= set(tm.all_tasks)
    args = {"pretrained": str(micro_path), "device": "cpu"}
    res = lm_eval.simple_evaluate(model="bgpo_dllm", model_args=args,
                                  tasks=["bgpo_sudoku"], task_manager=tm, bootstrap_iters=0,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    assert res["n-samples"]["bgpo_sudoku"]["effective"] == 2
    assert 0.0 <= res["results"]["bgpo_sudoku"]["reward,none"] <= 1.0
    assert res["config"]["bgpo_kind"] == "tiny"


def test_evaluate_trainer_checkpoint(micro_path, tmp_path):
    """``checkpoint=<run>/checkpoints/last.pt``: the run's config names the base model."""
    trained = micro_model(dtype=torch.float32)
    perturb(trained, scale=0.1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"kind": "tiny", "path": str(micro_path)}}))
    torch.save({"model": trained.net.state_dict(), "step": 3}, run / "checkpoints" / "last.pt")
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu"])
    model, out = bgpo_evaluate.load_model(cfg, "cpu")
    x = torch.randint(4, 50, (2, 7))
    assert out == run and torch.equal(model.logits(x), trained.logits(x))


# ---- the lm-eval CLI through the wrapper (indexes lm-eval's built-in tasks: ~10-20 s) ---------------
@pytest.mark.slow
def test_lm_eval_cli_wrapper(micro_path, tmp_path):
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bgpo.lm_eval_cli", "--model", "bgpo_dllm",
           "--model_args", f"pretrained={micro_path},mc_num=8", "--device", "cpu",
           "--tasks", "bgpo_countdown",
           "--limit", "4", "--batch_size", "4", "--include_path", str(TASKS_DIR),
           "--output_path", str(out), "--log_samples"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "bgpo_countdown" in p.stdout and "accuracy" in p.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["bgpo_countdown"]
    samples = [json.loads(line) for line in next(out.rglob("samples_bgpo_countdown_*.jsonl")).open()]
    texts = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    acc, reward = suite_score("countdown", texts)
    assert len(texts) == 4 and results["accuracy,none"] == acc
    assert results["reward,none"] == pytest.approx(reward)


# ---- model_args: unknown ones fail, hub options reach from_pretrained (issues 15.5, 16.7) ------------
def test_unknown_model_args_are_an_error(micro_path):
    import lm_eval

    msg = r"bgpo_dllm: unknown model_args \['gen_lenght'\]; allowed: \[.*'gen_length'"
    with pytest.raises(ValueError, match=msg):
        BGPODLLM.create_from_arg_string(f"pretrained={micro_path},gen_lenght=32", {"device": "cpu"})
    with pytest.raises(ValueError, match=r"unknown model_args \['gen_lenght'\]"):
        lm_eval.simple_evaluate(model="bgpo_dllm", model_args=f"pretrained={micro_path},gen_lenght=32",
                                tasks=["bgpo_countdown"], device="cpu")


def test_revision_and_trust_remote_code_are_honoured(micro_path, monkeypatch):
    import transformers

    import bgpo.lm_eval_model as lem
    from bgpo.model import load_dllm

    seen: list[dict] = []
    real = lem.load_dllm
    monkeypatch.setattr(lem, "load_dllm", lambda *a, **k: seen.append(k) or real(*a, **k))
    args = f"pretrained={micro_path},revision=v1.0,trust_remote_code=true"
    BGPODLLM.create_from_arg_string(args, {"device": "cpu"})
    BGPODLLM.create_from_arg_string(f"pretrained={micro_path}", {"device": "cpu"})
    assert [(k["revision"], k["trust_remote_code"]) for k in seen] == [("v1.0", True), (None, None)]

    # ... and load_dllm hands the revision to every from_pretrained (native classes included), and
    # trust_remote_code=True to the published-code path; nothing is loaded or downloaded
    import bgpo.model as bm
    from bgpo.models import DreamConfig, LLaDAConfig

    calls: list[tuple[str, dict]] = []

    def fake(name):
        def from_pretrained(path, **kwargs):
            calls.append((name, kwargs))
            raise RuntimeError("stop")
        return from_pretrained

    for owner, name in ((transformers.AutoModel, "AutoModel"), (transformers.AutoModelForCausalLM, "causal"),
                        (LLaDAConfig, "LLaDAConfig"), (DreamConfig, "DreamConfig")):
        monkeypatch.setattr(owner, "from_pretrained", fake(name))
    types = {"tiny": "gemma3_text", "llada": "llada", "dream": "Dream"}
    for kind, kwargs, want in [("tiny", {"revision": "abc"}, ("causal", "abc", None)),
                               ("llada", {"revision": "v2"}, ("LLaDAConfig", "v2", None)),
                               ("dream", {}, ("DreamConfig", None, None)),
                               ("llada", {"remote_code": True, "revision": "r"}, ("AutoModel", "r", True))]:
        cfg = micro_path.parent / f"cfg-{kind}" / "config.json"
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(json.dumps({"model_type": types[kind]}))
        monkeypatch.setattr(bm, "_config_file", lambda path, revision=None, f=cfg: f)
        calls.clear()
        with pytest.raises(RuntimeError, match="stop"):
            load_dllm(kind, "org/model", **kwargs)
        name, kw = calls[0]
        assert (name, kw.get("revision"), kw.get("trust_remote_code")) == want, kind


# ---- data-parallel evaluation: torchrun, 2 gloo processes == 1 process --------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_evaluation_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m bgpo.lm_eval_cli ...``: each rank generates its share, rank 0
    reports what one process reports (same accuracy and reward, same output and metric per problem)."""
    from bgpo.tasks.sudoku import all_grids

    # a micro model that writes 1s (its favourite token 'a' doubled into '1'), and 5 puzzles whose
    # empty cells are the 1s (solved) or the 1s and 2s (half right): accuracy 3/5, reward 4/5
    model = micro_model(seed=1, dtype=torch.float32)
    emb = model.net.get_input_embeddings().weight
    with torch.no_grad():
        emb[model.tokenizer.convert_tokens_to_ids("1")] = 2 * emb[model.tokenizer.convert_tokens_to_ids("a")]
    model.save(tmp_path / "model")
    grids = all_grids()[:5]
    rows = [(g.replace("1", "0") if i % 2 == 0 else g.replace("1", "0").replace("2", "0"), g)
            for i, g in enumerate(grids)]
    (tmp_path / "puzzles.csv").write_text("Puzzle,Solution\n" + "".join(f"{p},{g}\n" for p, g in rows))

    # one process (in memory, through the same lm-eval path)
    one_lm = BGPODLLM(pretrained=str(tmp_path / "model"), device="cpu", batch_size=2, progress=False)
    puzzles = str(tmp_path / "puzzles.csv")
    one = evaluate_suite_task(one_lm, "sudoku", {"test_file": puzzles}, log_samples=True)
    assert (one["accuracy"], one["reward"], one["n"]) == (0.6, pytest.approx(0.8), 5)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "bgpo.lm_eval_cli", "--model", "bgpo_dllm", "--model_args",
           f"pretrained={tmp_path / 'model'}", "--device", "cpu", "--tasks", "bgpo_sudoku",
           "--batch_size", "2", "--include_path", str(TASKS_DIR),
           "--metadata", json.dumps({"bgpo_test_file": puzzles}), "--log_samples", "--output_path", str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count("|bgpo_sudoku") == 1  # rank 0 alone prints the table
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["bgpo_sudoku"]
    assert results["accuracy,none"] == one["accuracy"]
    assert results["reward,none"] == pytest.approx(one["reward"])
    samples = sorted((json.loads(line) for line in next(out.rglob("samples_bgpo_sudoku_*.jsonl")).open()),
                     key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3, 4]  # every problem once, from both ranks
    assert [s["resps"][0][0] for s in samples] == one["completions"]
    task = get_task("sudoku", test_file=puzzles)
    pairs = zip(task.test_examples(), one["completions"], strict=True)
    per_problem = [task.reward(e, y, "compact") for e, y in pairs]
    assert [s["reward"] for s in samples] == pytest.approx(per_problem)
    assert len(set(per_problem)) > 1  # the problems differ: a mix-up between ranks would show
