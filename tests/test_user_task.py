"""A user's own data set as a task, from YAML, through every Ray stage: the definition travels with the config to
the teacher's replicas, the training workers and the evaluation actors; relative paths resolve against the
directory the command runs in; a bad record stops the run with one line naming file, line (as an editor numbers
it) and key; a run of user tasks only needs no data directory."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_fcot


def _coins(shared_data, path, break_record=None):
    """The coin-flip questions in a file of the user's own, with their own keys (the recorded 175B teacher's log
    matches them by question text): JSONL, or CSV or Parquet as `datasets` writes them."""
    examples = json.loads((shared_data / "datasets" / "coin_flip" / "coin_flip.json").read_text())["examples"]
    rows = [{"problem": e["question"], "solution": e["answer"]} for e in examples]
    if break_record is not None:
        del rows[break_record]["solution"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import datasets

        getattr(datasets.Dataset.from_list(rows), f"to_{path.suffix[1:]}")(path, **(
            {"index": False} if path.suffix == ".csv" else {}))


TASK = {"name": "coins", "path": "data/coins.jsonl", "question_key": "problem", "answer_key": "solution",
        "answer_type": "yes_no"}


FORMATS = {"jsonl": "coins", "csv": "coins_csv", "parquet": "coins_parquet"}  # file format -> its task


@pytest.fixture(scope="module")
def coins_run(tmp_path_factory, tiny_llama, shared_data) -> Path:
    """One `fcot run` of three user tasks (from YAML): the coin-flip questions in a JSONL, a CSV and a Parquet file,
    each its own task, in a folder of its own, relative paths against it, without FCOT_DATA_DIR and with no
    ~/.cache/fcot/data (a run of user tasks only needs no data dir), on a Ray cluster it starts itself (the empty
    cache reaches every worker): every stage reads each format in its own Ray workers. The tests below look at it
    format by format."""
    folder = tmp_path_factory.mktemp("coins")
    tasks = []
    for fmt, name in FORMATS.items():
        _coins(shared_data, folder / "data" / f"coins.{fmt}")
        tasks.append({**TASK, "name": name, "path": f"data/coins.{fmt}"})
    config = {
        "name": "coins", "output_dir": "run", "tasks": tasks, "methods": ["fine_tune_cot"],
        "baselines": ["zero_shot"], "wandb_mode": "disabled",
        "teacher": {"subset": 40, "engine": {
            "kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
            "path": str(shared_data / "teacher_logs" / "coin_flip_zero_shot_cot.log")}},
        "curate": {"max_length": 512},
        "train": {"model": str(tiny_llama), "epochs": 2, "batch_size": 4, "num_workers": 2, "max_steps": 3},
        "eval": {"subset": 10},
    }
    (folder / "coins.yaml").write_text(yaml.safe_dump(config))
    run_fcot("run", "coins.yaml", cwd=folder, env=_no_data_dir(folder), check=True)
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_fcot_run_on_a_user_task_defined_in_yaml(coins_run, fmt, tiny_llama, ray_local):
    tmp_path, task = coins_run, FORMATS[fmt]
    run = tmp_path / "run"
    assert (run / "report.md").exists()
    stages = {p.stem for p in (run / "stages").glob("*.json")}
    assert stages == {"teacher", "curate-fine_tune_cot", "train-fine_tune_cot", "eval-fine_tune_cot", "eval-zero_shot"}
    records = [r for f in (run / "teacher" / "records").glob("*.parquet") for r in pq.read_table(f).to_pylist()
               if r["task"] == task]
    assert len(records) == 40 and sum(r["correct"] for r in records) > 20
    train = json.loads((run / "stages" / "train-fine_tune_cot.json").read_text())["result"]
    assert train["steps"] == 3 and all(task in d["task"].split(",") for d in train["dev"])  # in a training worker
    metrics = json.loads((run / "eval" / "fine_tune_cot" / "metrics.json").read_text())
    assert metrics["tasks"][task]["n"] == 10 and metrics["tasks"][task]["random"] == 0.5
    saved = json.loads((run / "config.json").read_text())
    data_file = tmp_path / "data" / f"coins.{fmt}"
    assert saved["tasks"] == list(FORMATS.values())
    assert {t["name"]: t["path"] for t in saved["user_tasks"]}[task] == str(data_file)

    # The curated set and the teacher's records, handed on as a Hugging Face dataset folder with its card.
    import datasets

    exported = f"exported-{fmt}"
    out = run_fcot("export", "run", "--to", exported, cwd=tmp_path, check=True)
    assert json.loads(out.stdout)["dataset"] == str(tmp_path / exported)
    dataset = datasets.load_from_disk(tmp_path / exported)
    assert set(dataset) == {"fine_tune_cot", "teacher_records"}
    assert dataset["fine_tune_cot"].to_list() == pq.read_table(run / "curated" / "fine_tune_cot" / "train").to_pylist()
    assert sorted((r["index"], r["rationale"]) for r in dataset["teacher_records"] if r["task"] == task) == sorted(
        (r["index"], r["rationale"]) for r in records)
    card = (tmp_path / exported / "README.md").read_text()
    kept = sum(r["task"] == task for r in dataset["fine_tune_cot"])
    assert "text-davinci-002 (recorded engine)" in card
    assert re.search(rf"\| fine_tune_cot \| \w+ \| {task} \| \d+ \| {kept} \| \d+ \|", card), card
    again = run_fcot("export", "run", "--to", exported, cwd=tmp_path)
    assert again.returncode == 2 and f"{exported} exists: export writes a new folder" in again.stderr

    # The same definition, on a generating teacher: its replicas (Ray actors) score the user task.
    teach = {"tasks": [{**TASK, "name": task, "path": f"data/{data_file.name}"}], "subset": 4,
             "output_dir": f"taught-{fmt}", "progress": False,
             "engine": {"kind": "hf", "model": str(tiny_llama), "dtype": "float32"},
             "sampling": {"num_samples": 2, "max_new_tokens": 6, "answer_max_new_tokens": 3}}
    (tmp_path / f"teach-{fmt}.yaml").write_text(yaml.safe_dump(teach))
    out = run_fcot("teach", f"teach-{fmt}.yaml", cwd=tmp_path, check=True, cluster=ray_local)
    assert json.loads(out.stdout.strip().splitlines()[-1])["tasks"][task]["samples"] == 8

    # `fcot score` with the task file: the same definitions.
    completions = tmp_path / "completions.jsonl"
    completions.write_text(json.dumps({"index": 0, "completion": "so --> yes END", "answer": "yes"}) + "\n")
    out = run_fcot("score", "--task-file", "coins.yaml", "--task", task, "--input", completions, "--prefix=-->",
                   cwd=tmp_path, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["accuracy"] == 1.0


def _no_data_dir(tmp_path) -> dict:
    """No FCOT_DATA_DIR and an empty user cache (the DeepSpeed op built by setup is kept: no rebuild)."""
    from fcot.train.ds_ops import torch_extensions_dir

    return {"FCOT_DATA_DIR": "", "XDG_CACHE_HOME": str(tmp_path / "empty-cache"),
            "FCOT_TORCH_EXTENSIONS_DIR": str(torch_extensions_dir())}


def test_a_bad_record_in_a_user_task_stops_the_run_with_one_line(tmp_path, tiny_llama, shared_data):
    """Without FCOT_DATA_DIR and with no ~/.cache/fcot/data: a user task needs no paper data, and its bad record
    (the 8th line, no `solution`) stops the run before any Ray work, named by its line."""
    _coins(shared_data, tmp_path / "data" / "coins.jsonl", break_record=7)
    config = {"tasks": [TASK], "output_dir": "run", "methods": ["vanilla"], "baselines": [],
              "train": {"model": str(tiny_llama)}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = run_fcot("run", "bad.yaml", cwd=tmp_path, env=_no_data_dir(tmp_path))
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"fcot: error: {tmp_path / 'data' / 'coins.jsonl'}, line 8, key 'solution': missing; ")
    assert not (tmp_path / "run").exists()  # nothing ran


def test_majority_labels_curate_a_user_task_whose_training_questions_have_no_answer(tmp_path, tiny_llama,
                                                                                     shared_data, ray_local):
    """The training questions' answers hidden (test questions keep theirs): the recorded 175B teacher's answers
    label them. Gold labels, or a test question without its answer, stop the run before any work, named."""
    _coins(shared_data, tmp_path / "data" / "coins.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "data" / "coins.jsonl").read_text().splitlines()]
    hidden = [{k: v for k, v in r.items() if k != "solution"} for r in rows[:60]]
    (tmp_path / "data" / "coins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hidden + rows[60:]))
    (tmp_path / "data" / "split.json").write_text(json.dumps({"train": list(range(60)), "test": list(range(60, 80))}))
    task = {**TASK, "split_file": "data/split.json"}
    config = {
        "name": "coins", "output_dir": "run", "tasks": [task], "methods": ["fine_tune_cot"], "baselines": [],
        "wandb_mode": "disabled",
        "teacher": {"subset": 40, "engine": {
            "kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
            "path": str(shared_data / "teacher_logs" / "coin_flip_zero_shot_cot.log")}},
        "curate": {"label": "gold"},
        "train": {"model": str(tiny_llama), "epochs": 1, "batch_size": 4, "max_steps": 2},
        "eval": {"subset": 10},
    }
    (tmp_path / "gold.yaml").write_text(yaml.safe_dump(config))
    proc = run_fcot("run", "gold.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"fcot: error: {tmp_path / 'data' / 'coins.jsonl'}, line 1, key 'solution': missing; method fine_tune_cot "
        f"with curate.label gold"), proc.stderr

    config["curate"] = {"label": "majority"}
    (tmp_path / "majority.yaml").write_text(yaml.safe_dump(config))
    run_fcot("run", "majority.yaml", cwd=tmp_path, check=True, cluster=ray_local)
    run = tmp_path / "run"
    records = [r for f in (run / "teacher" / "records").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert len(records) == 40 and all(r["gold"] is None and r["correct"] is None for r in records)
    answered = {r["index"]: r["prediction"] for r in records if r["prediction"] is not None}
    stats = json.loads((run / "curated" / "fine_tune_cot" / "stats.json").read_text())["tasks"]["coins"]
    assert stats["dev_questions"] == 0  # dev is scored by gold: none here
    assert stats["labels"]["labeled"] == len(answered) > 30 and stats["labels"]["labeled_with_gold"] == 0
    pairs = pq.read_table(run / "curated" / "fine_tune_cot" / "train").to_pylist()
    assert {p["index"] for p in pairs} == set(answered) and stats["kept"] == len(pairs)
    assert all(p["completion"].endswith(f" --> {answered[p['index']]} END") for p in pairs)
    metrics = json.loads((run / "eval" / "fine_tune_cot" / "metrics.json").read_text())
    assert metrics["tasks"]["coins"]["n"] == 10
    assert "Majority labels" in (run / "report.md").read_text()

    config["methods"] = ["fine_tune_cot", "vanilla"]  # vanilla learns from gold answers, whatever the label
    (tmp_path / "vanilla.yaml").write_text(yaml.safe_dump(config))
    proc = run_fcot("run", "vanilla.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"fcot: error: {tmp_path / 'data' / 'coins.jsonl'}, line 1, key 'solution': missing; method vanilla "
    ), proc.stderr

    split = {"train": list(range(60)), "test": [0] + list(range(61, 80))}  # a test question without its answer
    (tmp_path / "data" / "split.json").write_text(json.dumps(split))
    proc = run_fcot("run", "majority.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"fcot: error: {tmp_path / 'data' / 'coins.jsonl'}, line 1, key 'solution': missing; evaluation on the test "
        f"split"), proc.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_of_user_tasks_only_needs_no_data_dir(coins_run, fmt):
    # The coins run had no FCOT_DATA_DIR and an empty user cache: it downloaded nothing, and evaluated its student
    # on each task, whatever its file's format.
    assert not (coins_run / "empty-cache" / "fcot" / "data").exists()
    metrics = json.loads((coins_run / "run" / "eval" / "zero_shot" / "metrics.json").read_text())
    assert metrics["tasks"][FORMATS[fmt]]["n"] == 10
