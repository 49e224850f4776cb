"""`fcot run` end to end on CPU: real 175B teacher records, a tiny student on Ray Train (2 workers, ZeRO-2),
evaluation and a baseline, report.md; killed mid-training and rerun: finished stages skipped, training resumed
from its last checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from fcot.contracts.records import RecordStore
from tests.conftest import ROOT, epoch_committed, run_fcot, sums_task


def _config(tmp_path, tiny_llama, shared_data):
    cfg = {
        "name": "tiny", "output_dir": str(tmp_path / "run"), "tasks": ["multiarith"],
        "methods": ["fine_tune_cot"], "baselines": ["zero_shot"], "wandb_mode": "offline",
        "teacher": {"subset": 40, "engine": {
            "kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
            "path": str(shared_data / "teacher_logs" / "multiarith_zero_shot_cot.log")}},
        "curate": {"max_length": 256, "dev_fraction": 0.1},
        "train": {"model": str(tiny_llama), "epochs": 3, "batch_size": 8, "num_workers": 2,
                  "deepspeed": {"stage": 2}, "dev": None},
        "eval": {"subset": 6, "max_new_tokens": 16},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_tree(proc):
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def test_run_end_to_end_killed_and_resumed(tmp_path, tiny_llama, shared_data, ray_local):
    """The `fcot run` process (and the local Ray cluster it started) killed mid-training, right after the first
    epoch's checkpoint is committed: the same command skips the finished stages and resumes training from that
    checkpoint, not from step 0 (on the session's cluster: the killed run's went with it)."""
    config = _config(tmp_path, tiny_llama, shared_data)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "run", str(config)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    student = run_dir / "students" / "fine_tune_cot"
    deadline = time.time() + 1200  # generous: CI machines are small and noisy

    def committed() -> bool:
        return epoch_committed(student)

    while not committed() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert committed(), "the run did not get through its first training epoch"
    _kill_tree(proc)
    assert not (run_dir / "stages" / "train-fine_tune_cot.json").exists(), "training ended before the kill"
    teacher_marker = json.loads((run_dir / "stages" / "teacher.json").read_text())

    finished = run_fcot("run", config, check=True, cluster=ray_local)
    assert "[teacher] done before, skipped" in finished.stderr
    # Progress of the long stages, as plain lines (not a terminal): training from its resumed step, evaluation.
    logs = finished.stdout + finished.stderr
    assert re.search(r"\[train\] (\d+)/\1 steps \(100%\), \d+ steps/min, epoch=3, tokens_per_s=\d+", logs), logs[-3000:]
    assert re.search(r"\[eval fine_tune_cot\] 6/6 questions \(100%\)", logs), logs[-3000:]
    assert "[curate-fine_tune_cot] done before, skipped" in finished.stderr
    assert json.loads((run_dir / "stages" / "teacher.json").read_text()) == teacher_marker
    stages = {p.stem for p in (run_dir / "stages").glob("*.json")}
    assert stages == {"teacher", "curate-fine_tune_cot", "train-fine_tune_cot", "eval-fine_tune_cot", "eval-zero_shot"}
    for method in ("fine_tune_cot", "zero_shot"):
        metrics = json.loads((run_dir / "eval" / method / "metrics.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "eval" / method / "predictions.jsonl").open()]
        assert metrics["tasks"]["multiarith"]["n"] == len(rows) == 6
        assert metrics["tasks"]["multiarith"]["accuracy"] == sum(r["correct"] for r in rows) / 6  # counted here
    train = json.loads((run_dir / "stages" / "train-fine_tune_cot.json").read_text())["result"]
    per_epoch = train["steps_per_epoch"]  # resumed from a committed epoch checkpoint: the first or a later one
    assert train["restarts"] == 1 and train["resumed_from_step"] in (per_epoch, 2 * per_epoch), train
    assert train["steps"] == train["planned_steps"] == 3 * per_epoch and len(train["loss_curve"]) == 3 * per_epoch
    report = (run_dir / "report.md").read_text()
    assert "| multiarith |" in report and "Teacher tokens" in report
    for png in ("accuracy.png", "curves.png", "kept.png", "cost.png"):  # vanilla runs in test_curate_eval/test_train
        assert (run_dir / png).stat().st_size > 1000
    config_written = json.loads((run_dir / "config.json").read_text())
    assert config_written["teacher"]["engine"]["api_key_env"] == "OPENAI_API_KEY"  # names stay, values never stored

    # Placement and logging keys changed (a resized cluster, W&B off): nothing is redone.
    again = run_fcot("run", config, "eval.engine.replicas=2", "teacher.progress=false", "wandb_mode=disabled",
                     "train.keep_checkpoints=2", "train.max_failures=5", check=True, cluster=ray_local)
    assert again.stderr.count("done before, skipped") == 5, again.stderr[-2000:]
    rebuilt = run_fcot("report", run_dir, check=True)
    assert rebuilt.stdout.strip().endswith("report.md")


def test_resume_redoes_a_stage_for_what_changes_its_results_and_never_for_placement(tmp_path, tiny_llama,
                                                                                 shared_data):
    """Stage markers hash what decides results: placement and logging keys leave every stage done; a changed
    model file makes every stage that reads the model stale, and the recorded teacher stays done."""
    import shutil

    from fcot.config import load_config
    from fcot.run import RunConfig, config_hash, stages

    model = shutil.copytree(tiny_llama, tmp_path / "student")
    config = _config(tmp_path, model, shared_data)

    def hashes(*overrides):
        return {s.name: config_hash(*s.inputs) for s in stages(load_config(RunConfig, config, list(overrides)))}

    before = hashes()
    assert set(before) == {"teacher", "curate-fine_tune_cot", "train-fine_tune_cot", "eval-fine_tune_cot",
                           "eval-zero_shot"}
    placement = ["teacher.engine.replicas=4", "teacher.engine.cpus_per_replica=2", "eval.engine.replicas=3",
                 "eval.engine.cpus_per_replica=0.5", "train.cpus_per_worker=4", "ray_address=ray://head:10001",
                 "teacher.progress=false", "wandb_mode=online", "train.wandb.project=other",
                 "train.keep_checkpoints=3"]
    assert hashes(*placement) == before
    assert hashes("train.lr=0.001")["train-fine_tune_cot"] != before["train-fine_tune_cot"]
    config_json = model / "config.json"
    config_json.write_text(config_json.read_text() + "\n")  # same model, other bytes: content decides
    after = hashes()
    assert after["teacher"] == before["teacher"]  # the recorded teacher never read the student
    assert all(after[name] != before[name] for name in before if name != "teacher"), (before, after)


def test_progress_prints_a_line_now_and_then_with_rate_and_eta_where_there_is_no_terminal():
    import io

    from fcot.progress import Progress

    out = io.StringIO()  # not a terminal: plain lines, not a bar
    with Progress("train", 10, "steps", stream=out, every_s=3600, done=4) as p:  # resumed at step 4
        for _ in range(3):
            p.update(1, tokens_per_s=123)
        assert out.getvalue() == ""  # no line before every_s has passed
        assert re.fullmatch(r"\[train\] 7/10 steps \(70%\), \d+ steps/min, tokens_per_s=123, ETA \d+s", p.line())
        p.every_s = 0
        p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[train] 8/10 steps (80%)") and "ETA" in lines[0]
    assert lines[1].startswith("[train] 8/10 steps (80%)")  # the last line, at close
    quiet = io.StringIO()
    with Progress("eval", 5, "questions", enabled=False, stream=quiet) as p:
        p.update(5)
    assert quiet.getvalue() == ""


def _kd_config(tmp_path, sums_server, tokenizer, student, logprobs=4):
    """A run of a served teacher of sums (tests.conftest) that returns logprobs, its tokenizer `tokenizer`."""
    cfg = {"name": "kd", "output_dir": str(tmp_path / "kd"), "tasks": ["sums"], "methods": ["fine_tune_cot"],
           "user_tasks": [sums_task(tmp_path / "data", 24)], "baselines": [], "wandb_mode": "disabled",
           "teacher": {"progress": False, "engine": {"kind": "openai", "model": "sums", "base_url": sums_server,
                                                     "tokenizer": str(tokenizer)},
                       "sampling": {"num_samples": 2, "logprobs": logprobs}},
           "curate": {"max_length": 256},
           "train": {"model": str(student), "epochs": 1, "batch_size": 4, "num_workers": 2,
                     "objective": {"kind": "kd", "temperature": 2.0, "alpha": 0.5}},
           "eval": {"subset": 4, "max_new_tokens": 8}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fcot_run_trains_a_kd_student_on_the_teachers_logprobs_and_refuses_another_tokenizer(tmp_path, tiny_llama,
                                                                                             sums_server, ray_local):
    """train.objective kd end to end on the local Ray cluster: a served teacher's top-4 logprobs are stored, the
    student (same tokenizer) learns them on its rationale tokens. Refused when the config is read: a student of
    another tokenizer (naming both models), a teacher that stores no logprobs."""
    from fcot.bundled import make_tiny_model

    run_fcot("run", _kd_config(tmp_path, sums_server, tiny_llama, tiny_llama), check=True, cluster=ray_local)
    trained = json.loads((tmp_path / "kd" / "stages" / "train-fine_tune_cot.json").read_text())["result"]
    assert trained["objective"] == "kd" and trained["steps"] > 0
    kd = trained["kd_tokens"]
    assert 0 < kd["with_teacher"] < kd["labels"]  # the rationale's tokens, not " --> answer END"
    # The top-k travel with the curated rows (each row its own record's): training reads nothing else.
    curated = pq.read_table(tmp_path / "kd" / "curated" / "fine_tune_cot" / "train").to_pylist()
    records = {(r["task"], r["index"], r["sample_index"]): r["logprobs"]
               for r in RecordStore(tmp_path / "kd" / "teacher" / "records").read(columns=[
                   "task", "index", "sample_index", "logprobs"]).to_pylist()}
    assert curated and all(r["teacher_logprobs"] == records[(r["task"], r["index"], r["sample_index"])]
                           for r in curated)
    assert trained["sharded_data"] and trained["examples_per_worker"] < trained["rows"]  # each worker its part
    teacher = json.loads((tmp_path / "kd" / "teacher" / "summary.json").read_text())
    store, n = teacher["store"], teacher["records"]
    assert store["records"] == n > 0 and 0 < store["logprobs_bytes"] < store["bytes"]
    per_record, without = store["bytes"] / n, (store["bytes"] - store["logprobs_bytes"]) / n
    assert (f"{per_record:,.0f} bytes per record; {without:,.0f} without its top-4 logprobs"
            in (tmp_path / "kd" / "report.md").read_text())
    other = make_tiny_model(tmp_path / "other-vocab", "llama", vocab_texts=["a b c d e f g h", "1 2 3 4 5 6 7 8 9"])
    refused = run_fcot("run", _kd_config(tmp_path, sums_server, tiny_llama, other), cluster=ray_local)
    assert refused.returncode != 0
    assert "the student" in refused.stderr and str(other) in refused.stderr and str(tiny_llama) in refused.stderr
    assert "tokenize differently" in refused.stderr
    no_logprobs = run_fcot("run", _kd_config(tmp_path, sums_server, tiny_llama, tiny_llama, logprobs=0),
                           cluster=ray_local)
    assert no_logprobs.returncode != 0 and "set teacher.sampling.logprobs" in no_logprobs.stderr


def _chaos_config(path, tmp_path, sums_server, tiny_llama):
    cfg = {"name": "chaos", "output_dir": str(path.with_suffix("")), "tasks": ["sums"], "methods": ["fine_tune_cot"],
           "user_tasks": [sums_task(tmp_path / "data", 40)], "baselines": [], "wandb_mode": "disabled",
           "stream": False,  # curation formats every shard in its own Ray Data actors (a node of theirs is lost)
           "teacher": {"progress": False, "engine": {"kind": "openai", "model": "sums", "replicas": 2, "batch_size": 4,
                                                     "base_url": f"{sums_server}/slow"},
                       "sampling": {"num_samples": 2, "temperature": 0.7}},
           "curate": {"max_length": 256},
           "train": {"model": str(tiny_llama), "epochs": 3, "batch_size": 4, "num_workers": 2, "cpus_per_worker": 1,
                     "deepspeed": {"stage": 2}, "dev": None, "max_failures": 8},
           "eval": {"engine": {"replicas": 2, "batch_size": 2}, "max_new_tokens": 16}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_whole_run_under_chaos_ends_as_an_undisturbed_one(tmp_path, tiny_llama, sums_server, lose_a_node):
    """`fcot run` (a served teacher at D = 2 on two replicas, curation, training on two workers, evaluation on two
    replicas) on a ray.cluster_utils.Cluster of a head and three one-CPU worker nodes, a node removed without grace in
    each stage while a process of that stage runs on it (training: once an epoch is committed) and a fresh one added:
    the records, the curated set, the student's steps and losses, and the predictions are the undisturbed run's,
    and no sample is generated twice beyond the batches lost with their nodes."""
    out = lose_a_node("run", _chaos_config(tmp_path / "chaos.yaml", tmp_path, sums_server, tiny_llama),
                      reference=_chaos_config(tmp_path / "calm.yaml", tmp_path, sums_server, tiny_llama), chaos=True)
    assert [r["stage"] for r in out["removals"]] == ["teacher", "curate", "train", "eval"], out["removals"]
    calm, chaos = tmp_path / "calm", tmp_path / "chaos"

    def records(run):
        rows = pq.read_table(run / "teacher" / "records").select(["task", "index", "sample_index", "seed", "rationale"])
        return sorted(tuple(r.values()) for r in rows.to_pylist())

    def curated(run):
        return sorted(json.dumps(r, sort_keys=True) for r in
                      pq.read_table(run / "curated" / "fine_tune_cot" / "train").to_pylist())

    def predictions(run):
        return [{k: r[k] for k in ("task", "index", "completion", "correct")}
                for r in map(json.loads, (run / "eval" / "fine_tune_cot" / "predictions.jsonl").open())]

    assert records(chaos) == records(calm) and curated(chaos) == curated(calm)
    teacher = json.loads((chaos / "stages" / "teacher.json").read_text())["result"]
    assert teacher["generated"] <= teacher["planned"] + 2 * 4 * 2  # a lost batch (4 questions x D) per replica, at most
    trained = [json.loads((run / "stages" / "train-fine_tune_cot.json").read_text())["result"] for run in (calm, chaos)]
    assert trained[1]["restarts"] >= 1 and trained[1]["steps"] == trained[0]["steps"]
    # Resumed from an epoch checkpoint (model, optimizer, data order and RNG restored): the same losses, step by step.
    assert trained[1]["loss_curve"] == pytest.approx(trained[0]["loss_curve"], abs=1e-4)
    assert predictions(chaos) == predictions(calm)
