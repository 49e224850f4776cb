import http.server
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()

# Every test reads the tasks from ../shared/data unless it says otherwise.
os.environ["FCOT_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("WANDB_MODE", "offline")
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's ~30 short trainings waits up
# to 2 s to be seen starting, reporting and ending; the local clusters the tests start inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "datasets").is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA} (the project expects ../shared/data beside it)")
    return SHARED_DATA


@pytest.fixture
def data_copy(tmp_path, shared_data):
    """A private copy of the data dir (small tasks only) that a test may corrupt."""
    dst = tmp_path / "data"
    for sub in ("splits",):
        shutil.copytree(shared_data / sub, dst / sub)
    for folder in ("MultiArith", "coin_flip", "Bigbench_Date", "SVAMP", "AQuA", "CommonsenseQA"):
        shutil.copytree(shared_data / "datasets" / folder, dst / "datasets" / folder)
    from fcot.tasks.loading import _load
    _load.cache_clear()
    yield dst
    _load.cache_clear()


def run_fcot(*args, env=None, check=False, cwd=None, cluster=None):
    """Run the real console entry point in a subprocess. `cluster`: the address of a running Ray cluster for it to
    join (RAY_ADDRESS, as on a real cluster), e.g. the session's `ray_local`; without it, fcot starts its own."""
    full_env = {**os.environ, **({"RAY_ADDRESS": cluster} if cluster else {}), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "fcot.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fcot {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, shared_data) -> Path:
    """A randomly initialised Llama-family decoder with a BPE tokenizer trained on real task text."""
    from fcot.bundled import make_tiny_model
    from fcot.tasks import load_records

    texts = [s.question for s in load_records("multiarith")]
    texts.append("Let's think step by step. Therefore, the answer is --> END ###")
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", vocab_texts=texts)


@pytest.fixture(scope="session")
def ray_local() -> str:
    """One local Ray cluster for the session (its address): the in-process tests use it, and `fcot` commands that
    need not start their own join it (run_fcot(..., cluster=ray_local)), as Ray's own suites share one cluster."""
    import ray

    from fcot.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def recorded(out, shared_data, task="multiarith", log="multiarith") -> dict:
    """The config of the recorded 175B teacher (its zero-shot-CoT log) writing into `out`."""
    return {"tasks": task, "output_dir": str(out), "progress": False,
            "engine": {"kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
                       "path": str(shared_data / "teacher_logs" / f"{log}_zero_shot_cot.log")}}


@pytest.fixture(scope="module")
def recorded_teacher(tmp_path_factory, shared_data):
    """The recorded 175B teacher's multiarith records, imported once per module."""
    from fcot.config import load_config
    from fcot.contracts.teacher import TeachConfig
    from fcot.teacher.pipeline import teach

    cfg = recorded(tmp_path_factory.mktemp("teacher"), shared_data)
    teach(load_config(TeachConfig, base=cfg))
    return cfg


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The bundled SmolLM2-135M-Instruct (prepared once into the user cache, as `fcot run` does on first use): a real
    model with a chat template, right on some coin-flip samples and not on others."""
    from fcot.bundled import prepare

    return str(prepare("smollm2-135m", log=lambda m: None))


@pytest.fixture(scope="session")
def lose_a_node(tmp_path_factory):
    """lose_a_node(stage, CONFIG, REFERENCE=None, replace=True, env=None, error=False) runs `stage` on CONFIG on a
    multi-node Ray cluster of this machine, a worker node removed mid-stage (and a fresh one added unless replace=False;
    `env` set in the driver meanwhile), and returns what it reported (tests/node_loss.py): the stage's result, or with
    error=True the error it must have raised. With chaos=True: `fcot run` of CONFIG (REFERENCE undisturbed first)
    with a node removed in each of its stages (tests.node_loss.chaos). One process and one cluster serve the
    session's node-loss tests (each on fresh worker nodes): the in-process tests share another cluster."""
    folder = tmp_path_factory.mktemp("node_loss")
    log = (folder / "cluster.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "tests.node_loss"], stdin=subprocess.PIPE, stdout=log,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    asked = itertools.count()

    def lose(stage: str, config: Path, reference: Path | None = None, replace: bool = True, env: dict | None = None,
             error: bool = False, chaos: bool = False) -> dict:
        result = folder / f"result-{next(asked)}.json"
        request = {"stage": stage, "config": str(config), "reference": str(reference) if reference else None,
                   "result": str(result), "replace": replace, "env": env, "chaos": chaos}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        deadline = time.time() + 1500
        while not result.exists() and server.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert result.exists(), f"no result from tests/node_loss.py:\n{(folder / 'cluster.log').read_text()[-6000:]}"
        out = json.loads(result.read_text())
        assert (out["error"] is not None) == error, out["error"]
        assert out["at_loss"] == {"running": True, "victim_found": True}, f"no node lost mid-stage: {out['at_loss']}"
        return out

    yield lose
    server.stdin.close()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log.close()


def epoch_committed(train_dir: Path) -> bool:
    """A training run (its output_dir) has committed an epoch's checkpoint: Ray Train writes this snapshot once its
    controller has collected every worker's report for it (a checkpoint before that can be lost). It lists the
    checkpoints kept (train.keep_checkpoints), so epoch_001 leaves it when a later epoch is committed."""
    snapshot = Path(train_dir) / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return '"epoch_' in snapshot.read_text()
    except OSError:
        return False


def sums_task(folder: Path, n: int = 40) -> dict:
    """A user task of n questions "What is A plus B?" (gold: the sum), written as JSONL into `folder`."""
    path = Path(folder) / "sums.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            a, b = (i * 7919) % 100, (i * 104729) % 100
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    return {"name": "sums", "path": str(path), "answer_type": "number", "test_fraction": 0.1}


SUMS = re.compile(r"What is (\d+) plus (\d+)\?")


class _Sums(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/completions that does sums: by seed % 6 a wrong sum, a rationale that two seeds
    share (duplicates), two other right ones, or a long one; the answer step repeats the rationale's last number.
    Asked for logprobs, it answers as vLLM does with return_tokens_as_token_ids: its text's tokens (tiny_llama's
    tokenizer) as `token_id:N`, each with a made-up top k (the emitted token first). Under BASE/slow, each answer
    takes 0.3 s, as a busy server's would (a run long enough to be killed mid-way)."""

    def do_POST(self):
        if self.path.startswith("/slow/"):
            time.sleep(0.3)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt, seed = body["prompt"], int(body.get("seed") or 0)
        a, b = map(int, SUMS.search(prompt).groups())
        if prompt.rstrip().endswith("Therefore, the answer is"):
            text = f" {re.findall(r'[0-9]+', prompt.split('step by step.')[-1])[-1]}."
        else:
            total = a + b + (seed % 6 == 0)
            text = [f" {a} and {b} make {total}.", f" We add {a} and {b}, which gives {total}.",
                    f" We add {a} and {b}, which gives {total}.", f" {a} plus {b} is {total}.",
                    " First " + " ".join(f"{a} then {b} again," for _ in range(12)) + f" so {total}.",
                    f" The sum of {a} and {b} is {total}."][seed % 6]
        choice = {"text": text, "finish_reason": "stop"}
        if body.get("logprobs"):
            ids = self.server.tokenizer(text, add_special_tokens=False).input_ids
            vocab = len(self.server.tokenizer)
            top = [{f"token_id:{(t + j * 7) % vocab}": -0.2 - j for j in range(body["logprobs"])} for t in ids]
            choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-0.2] * len(ids),
                                  "top_logprobs": top}
        data = json.dumps({"choices": [choice],
                           "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def sums_server(tiny_llama):
    """A real HTTP server on 127.0.0.1 (its base URL): a teacher of many distinct, duplicate, wrong and long samples."""
    from transformers import AutoTokenizer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sums)
    server.tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
