"""The teacher stage end to end on CPU with a tiny random model: records, cache, faults, formats."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from fcot.config import apply_override, load_config
from fcot.contracts.records import RecordStore
from fcot.contracts.teacher import TeachConfig
from fcot.teacher.pipeline import teach
from tests.conftest import ROOT, run_fcot


def _cfg(tmp_path, model, **over) -> TeachConfig:
    base = {"tasks": "multiarith", "subset": 4, "output_dir": str(tmp_path / "teacher"), "progress": False,
            "engine": {"kind": "hf", "model": str(model), "dtype": "float32", "replicas": 2, "batch_size": 4},
            "sampling": {"num_samples": 3, "max_new_tokens": 12, "answer_max_new_tokens": 6}}
    for key, value in over.items():
        apply_override(base, f"{key}={json.dumps(value)}")
    return load_config(TeachConfig, base=base)


def _all_rows(out_dir):
    return [r for shard in sorted((out_dir / "records").glob("*.parquet")) for r in pq.read_table(shard).to_pylist()]


def test_teach_writes_n_x_d_records_and_a_rerun_generates_nothing(tmp_path, tiny_llama, ray_local):
    cfg = _cfg(tmp_path, tiny_llama)
    landed = []
    first = teach(cfg, on_shard=landed.append)
    assert (first["planned"], first["records"], first["generated"]) == (12, 12, 12)
    assert sorted(landed) == sorted((tmp_path / "teacher" / "records").glob("*.parquet")) and len(landed) == 3
    rows = _all_rows(tmp_path / "teacher")
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12
    questions = {r["index"] for r in rows}
    assert {(r["index"], r["sample_index"]) for r in rows} == {(i, k) for i in questions for k in range(3)}
    r = rows[0]
    assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA: Let's think step by step.")
    assert r["temperature"] == pytest.approx(0.7) and r["engine"] == "hf" and r["completion_tokens"] > 0
    assert r["finish_reason"] in ("stop", "length") and r["model"] == tiny_llama.name and len(r["teacher_id"]) == 16

    again = teach(cfg)
    assert (again["records"], again["generated"]) == (12, 0)
    more = teach(_cfg(tmp_path, tiny_llama, **{"sampling.num_samples": 5}))
    assert (more["records"], more["generated"]) == (20, 8)  # only the 2 new samples of each question
    summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert summary["tasks"]["multiarith"]["samples"] == 20


def test_a_replica_the_cluster_cannot_place_holds_no_batch(tmp_path, tiny_llama, ray_local):
    """Two replicas of 1.5 CPUs on the 2-CPU local cluster: one is placed, the other waits for room that never
    comes (an autoscaler out of capacity). A batch goes only to a replica that is up, so the run finishes on the one
    placed, every sample written once, instead of waiting forever on batches queued at the one never placed."""
    cfg = _cfg(tmp_path, tiny_llama, **{"engine.cpus_per_replica": 1.5})
    done = teach(cfg)
    assert (done["planned"], done["records"], done["generated"]) == (12, 12, 12)
    assert len({r["key"] for r in _all_rows(tmp_path / "teacher")}) == 12


def test_the_store_finds_a_teachers_shards_by_name_and_reads_only_the_columns_asked(tmp_path):
    """Shards are named TEACHER_ID-HASH: finding teacher B's opens none of teacher A's (here one is not even
    parquet), a shard of an older fcot (HASH only) is still found by its content, and reads take the columns
    asked for."""
    import pyarrow as pa

    from fcot.contracts.records import SCHEMA

    def row(tid, i):
        return {"task": "multiarith", "index": i, "sample_index": 0, "key": f"{tid}:{i}", "teacher_id": tid,
                "teacher": "{}", "question": "q", "gold": "1", "prompt": "p", "rationale": "r", "correct": True}

    store = RecordStore(tmp_path / "records")
    b1 = store.write([row("b" * 16, i) for i in range(3)])
    assert b1.name.startswith("b" * 16 + "-")
    (tmp_path / "records" / f"{'a' * 16}-{'0' * 24}.parquet").write_bytes(b"not parquet: never opened for b")
    older = tmp_path / "records" / f"{'1' * 24}.parquet"  # an older fcot's name: the keys' hash only
    pq.write_table(pa.Table.from_pylist([row("b" * 16, 9)], schema=SCHEMA), older)
    assert store.shards("b" * 16) == [b1, older]
    assert store.keys("b" * 16) == {f"{'b' * 16}:{i}" for i in (0, 1, 2, 9)}
    table = store.read(teacher_id="b" * 16, columns=["index"])
    assert table.column_names == ["key", "teacher_id", "index"] and sorted(table.column("index").to_pylist()) == [
        0, 1, 2, 9]


def test_records_are_readable_by_ray_data_and_datasets(tmp_path, tiny_llama, ray_local):
    import datasets
    import ray

    cfg = _cfg(tmp_path, tiny_llama, **{"sampling.num_samples": 1, "engine.replicas": 1})
    teach(cfg)
    records = tmp_path / "teacher" / "records"
    assert ray.data.read_parquet(str(records)).count() == 4
    ds = datasets.load_dataset("parquet", data_files=str(records / "*.parquet"), split="train")
    assert len(ds) == 4 and set(ds["temperature"]) == {0.0}  # D = 1 is greedy


def test_chat_prompt_style_continues_the_assistant_turn(tmp_path, tiny_llama, ray_local):
    summary = teach(_cfg(tmp_path, tiny_llama, prompt_style="chat",
                         **{"sampling.num_samples": 1, "engine.replicas": 1}))
    assert summary["generated"] == 4
    row = _all_rows(tmp_path / "teacher")[0]
    messages = json.loads(row["prompt"])
    assert messages[-1] == {"role": "assistant", "content": "Let's think step by step."}
    assert row["prompt_style"] == "chat"


def test_a_killed_replica_is_replaced_and_the_run_completes_without_duplicates(tmp_path, tiny_llama, ray_local):
    cfg = _cfg(tmp_path, tiny_llama, subset=12, **{"sampling.num_samples": 4, "sampling.max_new_tokens": 48,
                                                  "engine.batch_size": 4})
    def replicas() -> set[int]:
        # Ray titles each replica's process `ray::TeacherWorker...`; only this session's own cluster is searched
        # (its raylet is a child of this process), never another program's.
        pids = set()
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # ended meanwhile (a zombie: the one just killed)
                if "TeacherWorker" in " ".join(p.cmdline() or []):
                    pids.add(p.pid)
        return pids

    result = {}
    runner = threading.Thread(target=lambda: result.update(teach(cfg)))
    runner.start()
    records = tmp_path / "teacher" / "records"
    deadline = time.time() + 300
    while not list(records.glob("*.parquet")) and time.time() < deadline:
        time.sleep(0.2)
    before = replicas()
    assert before, "no engine replica alive mid-run"
    psutil.Process(min(before)).send_signal(signal.SIGKILL)
    # The killed replica comes back (Ray restarts its actor, max_restarts, and runs its batch again): a new
    # TeacherWorker process, while the run waits for that batch.
    restarted = set()
    while runner.is_alive() and not restarted:
        restarted = replicas() - before
        time.sleep(0.1)
    runner.join(timeout=600)
    assert restarted, "no replica process started after the kill"
    assert result["records"] == 48
    rows = _all_rows(tmp_path / "teacher")
    assert len(rows) == 48 and len({r["key"] for r in rows}) == 48  # exactly N x D, no duplicates


def test_killed_driver_resumes_without_generating_finished_samples_again(tmp_path, tiny_llama, ray_local):
    config = tmp_path / "teach.yaml"
    cfg = _cfg(tmp_path, tiny_llama, subset=12, **{"sampling.num_samples": 4, "sampling.max_new_tokens": 48,
                                                  "engine.batch_size": 4, "engine.replicas": 1})
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "teach", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / "teacher" / "records"
    deadline = time.time() + 300
    while len(list(records.glob("*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # Kill the driver and everything it started (its local Ray cluster: GCS, raylet, the replica).
    tree = [proc_ for proc_ in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    done = len(RecordStore(records).keys())
    assert 0 < done < 48

    finished = run_fcot("teach", config, check=True, cluster=ray_local)
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary["records"] == 48
    assert summary["generated"] == 48 - done  # nothing finished before the kill was generated again
    rows = _all_rows(tmp_path / "teacher")
    assert len({r["key"] for r in rows}) == 48


def test_a_worker_node_lost_mid_run_loses_nothing_and_repeats_nothing(tmp_path, tiny_llama, lose_a_node):
    """A head without CPUs and two one-CPU worker nodes (ray.cluster_utils.Cluster), a replica on each: one node
    removed without grace when the first shard lands, and no node added (an autoscaler out of capacity): the
    replacement replica can never be placed, so the surviving one runs the lost batches and the rest. The run
    completes with exactly N x D distinct samples, and only the lost batches are generated again."""
    cfg = _cfg(tmp_path, tiny_llama, subset=24, **{"sampling.num_samples": 4, "sampling.max_new_tokens": 48,
                                                  "engine.batch_size": 4})
    config = tmp_path / "teach.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    out = lose_a_node("teach", config, replace=False)
    rows = _all_rows(tmp_path / "teacher")
    assert len(rows) == 96 and len({r["key"] for r in rows}) == 96  # exactly N x D, none twice
    # Generated: what the replicas reported, each batch once. A batch in flight on the lost replica (IN_FLIGHT of
    # them, 4 samples each) is retried: generated by the retry if the lost one had not written it, else read back,
    # not generated again, its count gone with the lost replica. So N x D less at most those batches.
    assert 96 - 2 * 4 <= out["result"]["generated"] <= 96, out["result"]


def test_teacher_logprobs_are_stored_as_one_column_read_only_when_asked(tmp_path, tiny_llama, ray_local):
    """teacher.sampling.logprobs: k: each record carries its rationale tokens' top-k ids and logprobs (float16),
    one per emitted token; a store read without naming the column leaves it out; a shard written without the column
    (an older fcot) reads as null; the teacher is another teacher (its identity names k and the tokenizer)."""
    import pyarrow as pa

    from fcot.contracts.records import SCHEMA
    from fcot.contracts.teacher import teacher_id
    from fcot.models import tokenizer_identity

    cfg = _cfg(tmp_path, tiny_llama, **{"sampling.logprobs": 3, "engine.replicas": 1})
    summary = teach(cfg)
    assert summary["teacher"]["logprobs"] == 3 and summary["teacher"]["tokenizer"] == tokenizer_identity(tiny_llama)
    assert teacher_id(cfg) != teacher_id(_cfg(tmp_path, tiny_llama))
    shards = sorted((tmp_path / "teacher" / "records").glob("*.parquet"))
    assert pq.read_schema(shards[0]).field("logprobs").type == SCHEMA.field("logprobs").type  # float16 inside
    store = RecordStore(tmp_path / "teacher" / "records")
    assert "logprobs" not in store.read(teacher_id(cfg)).column_names
    rows = store.read(teacher_id(cfg), columns=["completion_tokens", "logprobs"]).to_pylist()
    assert len(rows) == 12
    for r in rows:
        lp = r["logprobs"]
        assert len(lp["tokens"]) == len(lp["top_ids"]) == len(lp["top_logprobs"]) == r["completion_tokens"]
        assert all(len(t) == 3 for t in lp["top_ids"]) and all(v[0] >= v[1] >= v[2] for v in lp["top_logprobs"])
        assert all(sum(math.exp(x) for x in v) <= 1.01 for v in lp["top_logprobs"])  # a part of a distribution
    older = tmp_path / "older"
    older.mkdir()
    without = pa.schema([f for f in SCHEMA if f.name != "logprobs"])
    pq.write_table(pq.read_table(shards[0], columns=without.names), older / shards[0].name)
    again = RecordStore(older).read(teacher_id(cfg), columns=["index", "logprobs"]).to_pylist()
    assert again and all(r["logprobs"] is None for r in again)


def test_logprobs_are_refused_where_the_teacher_cannot_give_them_naming_the_key(tmp_path, tiny_llama, shared_data):
    from fcot.errors import FcotError
    from tests.conftest import recorded

    with pytest.raises(FcotError, match=r"key 'teacher.sampling.logprobs': a recorded teacher's outputs carry no"):
        load_config(TeachConfig, base={**recorded(tmp_path, shared_data), "sampling": {"logprobs": 2}})
    served = {"kind": "openai", "model": "served", "base_url": "http://127.0.0.1:9"}
    with pytest.raises(FcotError, match=r"key 'teacher.engine.tokenizer': logprobs from a served model"):
        _cfg(tmp_path, tiny_llama, engine=served, **{"sampling.logprobs": 2})
    assert _cfg(tmp_path, tiny_llama, engine={**served, "tokenizer": str(tiny_llama)}, **{"sampling.logprobs": 2})
