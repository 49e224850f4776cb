"""Curation on Ray Data and evaluation on Ray, on CPU with tiny models and real 175B teacher records."""

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import fcot.curate
from fcot.config import load_config
from fcot.contracts.records import RecordStore
from fcot.contracts.teacher import TeachConfig
from fcot.curate import CurateConfig, ShardStreamer, curate
from fcot.errors import FcotError
from fcot.evaluate import EvalConfig, evaluate
from fcot.predict import predict_samples
from fcot.teacher.pipeline import teach
from tests.conftest import recorded, sums_task


def _rows(folder):
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_curation_keeps_correct_formatted_pairs_with_stats(tmp_path, recorded_teacher, tiny_llama, ray_local):
    summary = curate(load_config(CurateConfig, base={
        "tasks": "multiarith", "teacher": recorded_teacher, "student": str(tiny_llama),
        "output_dir": str(tmp_path / "cur"), "dev_fraction": 0.1, "max_length": 512}))
    st = summary["tasks"]["multiarith"]
    assert st["samples"] == 378 and st["dev_samples"] == 42 and st["dev_questions"] == 42 and st["questions"] == 378
    assert st["kept"] + st["dropped_incorrect"] + st.get("dropped_too_long", 0) == 378
    rows = _rows(tmp_path / "cur" / "train")
    assert len(rows) == st["kept"] > 250
    r = rows[0]
    assert r["prompt"].endswith(" ###") and r["completion"].startswith(" ") and r["completion"].endswith(" END")
    assert " --> " in r["completion"]
    dev = [json.loads(line) for line in (tmp_path / "cur" / "dev.jsonl").read_text().splitlines()]
    assert len(dev) == 42 and not {d["index"] for d in dev} & {r["index"] for r in rows}


def test_choosing_d_and_max_length_and_vanilla(tmp_path, recorded_teacher, tiny_llama, ray_local):
    short = curate(load_config(CurateConfig, base={
        "tasks": "multiarith", "teacher": recorded_teacher, "student": str(tiny_llama), "dev_fraction": 0,
        "output_dir": str(tmp_path / "short"), "max_length": 150, "num_samples": 1}))
    st = short["tasks"]["multiarith"]
    assert st["dropped_too_long"] > 0 and max(r["length"] for r in _rows(tmp_path / "short" / "train")) <= 150
    vanilla = curate(load_config(CurateConfig, base={
        "method": "vanilla", "tasks": "multiarith", "student": str(tiny_llama), "output_dir": str(tmp_path / "van"),
        "dev_fraction": 0}))
    assert vanilla["kept"] == 420
    r = _rows(tmp_path / "van" / "train")[0]
    assert r["prompt"].endswith(" ###") and "-->" not in r["completion"]


def test_shards_formatted_while_the_teacher_runs_give_the_same_curation(tmp_path, recorded_teacher, tiny_llama,
                                                                        ray_local):
    """What `fcot run` streams (ShardStreamer, shard by shard) and what curation formats on Ray Data agree."""
    records = RecordStore(f"{recorded_teacher['output_dir']}/records").read().to_pylist()
    store = RecordStore(tmp_path / "teacher" / "records")
    for start in range(0, len(records), 150):  # three shards, as three replica batches would land
        store.write(records[start:start + 150])
    shards = store.shards()
    assert len(shards) == 3

    def config(name):
        teacher = {**recorded_teacher, "output_dir": str(tmp_path / "teacher")}
        return load_config(CurateConfig, base={"tasks": "multiarith", "teacher": teacher,
                                               "student": str(tiny_llama), "output_dir": str(tmp_path / name),
                                               "dev_fraction": 0.1, "max_length": 300})

    streamer = ShardStreamer(config("streamed"))
    for shard in shards[:2]:  # the third lands after the teacher was killed, say: curation formats it
        streamer(shard)
    assert streamer.formatted == 2 and not streamer.failed
    streamed = curate(config("streamed"))
    whole = curate(config("whole"))
    assert streamed["shards_formatted_at_curation"] == 1 and whole["shards_formatted_at_curation"] == 3
    assert streamed["tasks"] == whole["tasks"] and streamed["kept"] == whole["kept"] > 250
    key = lambda r: (r["index"], r["sample_index"])  # noqa: E731
    streamed_rows, whole_rows = _rows(tmp_path / "streamed" / "train"), _rows(tmp_path / "whole" / "train")
    assert sorted(streamed_rows, key=key) == sorted(whole_rows, key=key)
    again = curate(config("streamed"))  # formatted parts are reused
    assert again["shards_formatted_at_curation"] == 0 and again["kept"] == streamed["kept"]


def test_evaluate_on_ray_reports_accuracy(tmp_path, tiny_llama, ray_local):
    metrics = evaluate(load_config(EvalConfig, base={
        "engine": {"model": str(tiny_llama), "replicas": 2}, "tasks": "multiarith", "subset": 6, "max_new_tokens": 8,
        "output_dir": str(tmp_path / "eval"), "self_consistency": 3}))
    m = metrics["tasks"]["multiarith"]
    assert m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0 and m["k"] == 3 and m["maj@k"] == m["accuracy"]
    lo, hi = m["accuracy_ci"]
    assert lo <= m["accuracy"] <= hi and 0 <= m["majority"] <= 1 and m["random"] is None  # open numeric answers
    assert m["pass@1"] <= m["pass@k"] and m["maj@k"] <= m["pass@k"]
    assert metrics["cpu_s"] > 0 and metrics["gpu_s"] == 0
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all("completion" in p and "correct" in p for p in preds)
    # every sample kept, through Ray Data: its answer, correctness, length and text
    assert all(len(p[f"sample_{c}"]) == 3 for p in preds for c in ("predictions", "correct", "completion_tokens",
                                                                  "completions"))
    assert m["pass@k"] == sum(any(p["sample_correct"]) for p in preds) / 6
    assert m["accuracy"] == sum(p["correct"] for p in preds) / 6  # the voted answers, counted here
    assert m["pass@1"] == sum(sum(p["sample_correct"]) for p in preds) / 18


def test_baseline_methods_and_self_consistency(tiny_llama):
    from fcot.engines import HFEngine
    from fcot.tasks import load_split

    engine = HFEngine(str(tiny_llama), dtype="float32")
    samples = [s.to_dict() for s in load_split("multiarith", "test")[:2]]
    for method in ("zero_shot", "zero_shot_cot", "few_shot_cot", "vanilla", "fine_tune_cot"):
        rows = predict_samples(engine, samples, method, max_new_tokens=6)
        assert len(rows) == 2 and {"correct", "prediction", "completion"} <= set(rows[0])
    voted = predict_samples(engine, samples, "fine_tune_cot", max_new_tokens=6, k=3)
    assert voted[0]["k"] == 3 and len(voted[0]["sample_predictions"]) == len(voted[0]["sample_completions"]) == 3
    v = voted[0]  # votes: how many samples gave the winning answer (0 when none gave an answer)
    assert v["votes"] == (v["sample_predictions"].count(v["prediction"]) if v["prediction"] is not None else 0)


def test_pass_at_1_maj_at_k_and_pass_at_k_on_a_hand_computed_case(shared_data):
    """k = 3 scripted answers for 4 questions (g: gold, x/y: wrong): [g g x], [x y g] (a three-way tie: the first
    seen, x, wins), [x x x], [g x g]. maj@3 = 2/4, pass@1 = (2/3 + 1/3 + 0 + 2/3) / 4 = 5/12, pass@3 = 3/4."""
    from fcot.engines import Completion
    from fcot.evaluate import task_metrics
    from fcot.tasks import load_split

    split = load_split("svamp", "test")[:4]
    script = {s.question: answers for s, answers in zip(split, ["ggx", "xyg", "xxx", "gxg"])}
    gold = {s.question: float(s.answer) for s in split}
    given: dict[str, int] = {}
    seeds = []

    class Scripted:
        def generate(self, requests):
            out = []
            for r in requests:
                q = r.prompt[:-4]  # "{question} ###"
                j = given[q] = given.get(q, -1) + 1
                value = {"g": gold[q], "x": gold[q] + 1, "y": gold[q] + 2}[script[q][j]]
                out.append(Completion(f" reasoning --> {value:g} END", "stop", 1, 1))
                seeds.append(r.seed)
            return out

    rows = predict_samples(Scripted(), [s.to_dict() for s in split], "fine_tune_cot", k=3)
    assert [r["votes"] for r in rows] == [2, 1, 3, 2] and [r["correct"] for r in rows] == [True, False, False, True]
    assert [r["sample_correct"] for r in rows] == [[c == "g" for c in script[s.question]] for s in split]
    m = task_metrics("svamp", rows, split)
    assert (m["k"], m["maj@k"], m["accuracy"], m["pass@k"]) == (3, 0.5, 0.5, 0.75)
    assert abs(m["pass@1"] - 5 / 12) < 1e-12
    for key in ("pass@1", "maj@k", "pass@k"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi
    assert len(set(seeds)) == 12
    # Per-sample seeds never collide, whatever k: 2 questions x 200 samples, 400 seeds (the old rule,
    # seed * 100003 + index * 101 + j, gave question i's sample 101 the seed of question i + 1's sample 0).
    from fcot.predict import make_requests

    many = make_requests("fine_tune_cot", [s.to_dict() for s in split[:2]], 8, 200, 0.7, 0, False)
    assert len({r.seed for r in many}) == 400


def test_scoring_a_perfect_student_is_100_percent(shared_data):
    """Evaluation is not bent: an engine that writes the gold answer in the Fine-tune-CoT format scores 1.0."""
    from fcot.engines import Completion
    from fcot.tasks import load_split

    samples = [s.to_dict() for s in load_split("svamp", "test")[:20]]
    gold = {s["question"]: s["answer"] for s in samples}

    class Oracle:
        def generate(self, requests):
            return [Completion(f" some reasoning --> {gold[r.prompt[:-4]]} END", "stop", 1, 1) for r in requests]

    rows = predict_samples(Oracle(), samples, "fine_tune_cot")
    assert all(r["correct"] for r in rows)


def test_one_store_of_two_teachers_curates_what_separate_stores_would(tmp_path, recorded_teacher, tiny_llama,
                                                                      shared_data, ray_local):
    """The recorded 175B teacher and a tiny local model write into one store; each run's curation reads only its
    own teacher's records, exactly as from a store of its own."""
    big = recorded(tmp_path / "shared", shared_data)
    small = {"tasks": "multiarith", "subset": 8, "output_dir": str(tmp_path / "shared"), "progress": False,
             "engine": {"kind": "hf", "model": str(tiny_llama), "dtype": "float32", "batch_size": 8},
             "sampling": {"num_samples": 2, "max_new_tokens": 8, "answer_max_new_tokens": 4}}
    teach(load_config(TeachConfig, base=big))
    teach(load_config(TeachConfig, base=small))
    alone = {**small, "output_dir": str(tmp_path / "alone")}
    teach(load_config(TeachConfig, base=alone))
    shared_rows = RecordStore(tmp_path / "shared" / "records").read().to_pylist()
    assert len({r["teacher_id"] for r in shared_rows}) == 2 and len(shared_rows) == 420 + 16

    def run(teacher, name):
        cfg = load_config(CurateConfig, base={"tasks": "multiarith", "teacher": teacher, "student": str(tiny_llama),
                                              "output_dir": str(tmp_path / name), "max_length": 512})
        try:
            return curate(cfg), sorted((r["index"], r["completion"]) for r in _rows(tmp_path / name / "train"))
        except FcotError as e:  # the tiny random teacher is never right: curation keeps nothing, and says so
            return str(e), None

    shared_big, separate_big = run(big, "big-shared"), run(recorded_teacher, "big-alone")
    assert shared_big[1] == separate_big[1] and len(shared_big[1]) == shared_big[0]["kept"] > 250
    assert shared_big[0]["tasks"] == separate_big[0]["tasks"]
    shared_small, separate_small = run(small, "small-shared"), run(alone, "small-alone")
    assert shared_small == separate_small and '"samples": 16' in shared_small[0]  # 8 questions x D = 2 only


def test_data_size_is_a_nested_seeded_subset_applied_at_curation(tmp_path, recorded_teacher, tiny_llama, ray_local):
    def kept(n, seed=0):
        summary = curate(load_config(CurateConfig, base={
            "tasks": "multiarith", "teacher": recorded_teacher, "student": str(tiny_llama), "seed": seed,
            "output_dir": str(tmp_path / f"n{n}-{seed}"), "train_questions": n, "max_length": 512}))
        rows = _rows(tmp_path / f"n{n}-{seed}" / "train")
        dev = {json.loads(line)["index"] for line in (tmp_path / f"n{n}-{seed}" / "dev.jsonl").read_text().splitlines()}
        return summary, {r["index"] for r in rows}, dev

    small, large, half = kept(40), kept(200), kept(0.5)
    assert small[0]["tasks"]["multiarith"]["questions"] == 40 and half[0]["tasks"]["multiarith"]["questions"] == 189
    assert small[1] <= large[1] and small[1] <= half[1]  # a smaller set is a subset of every larger one
    assert small[2] == large[2] == half[2] and len(small[2]) == 42  # the same dev split at every size
    assert not small[2] & large[1]
    other = kept(40, seed=1)
    assert other[1] != small[1]  # seeded


def _config_file(path, cfg):
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def test_a_worker_node_lost_mid_curation_or_evaluation_changes_no_output(tmp_path, recorded_teacher, tiny_llama,
                                                                         lose_a_node):
    """On a ray.cluster_utils.Cluster (a head without CPUs, two one-CPU worker nodes), curation and evaluation
    each run once undisturbed and once with the node of their Ray Data work (a formatter task; an engine replica)
    removed without grace mid-stage and no node added (an autoscaler out of capacity): Ray Data retries the task or
    restarts the actor on the node left, and the outputs are the same rows."""
    def curation(name):
        return _config_file(tmp_path / f"{name}.yaml", load_config(CurateConfig, base={
            "tasks": "multiarith", "teacher": recorded_teacher, "student": str(tiny_llama),
            "output_dir": str(tmp_path / name), "dev_fraction": 0.1, "max_length": 512}))

    out = lose_a_node("curate", curation("lost"), reference=curation("undisturbed"), replace=False)
    assert out["result"]["tasks"] == out["reference"]["tasks"] and out["result"]["kept"] > 250
    assert _rows(tmp_path / "lost" / "train") == _rows(tmp_path / "undisturbed" / "train")
    assert (tmp_path / "lost" / "dev.jsonl").read_text() == (tmp_path / "undisturbed" / "dev.jsonl").read_text()

    def evaluation(name):
        return _config_file(tmp_path / f"{name}.yaml", load_config(EvalConfig, base={
            "engine": {"model": str(tiny_llama), "replicas": 2, "batch_size": 2}, "tasks": "multiarith",
            "subset": 40, "max_new_tokens": 32, "output_dir": str(tmp_path / name)}))

    out = lose_a_node("evaluate", evaluation("eval_lost"), reference=evaluation("eval_undisturbed"),
                      replace=False)
    assert out["result"]["tasks"]["multiarith"]["n"] == 40

    def predictions(name):
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return [{k: r[k] for k in ("task", "index", "completion", "prediction", "correct")} for r in rows]

    assert predictions("eval_lost") == predictions("eval_undisturbed")  # greedy: the same answers, none twice


GOLDEN = Path(__file__).parent / "data" / "curated_golden.json"
VOLATILE = ("cpu_s", "train_dir", "dev", "shards_formatted_at_curation", "teacher_id")  # paths, timings, the port


def _golden_cases(tmp_path, recorded_teacher, sums_server, tiny_llama) -> dict:
    """Curation's cases, each run on one store: the recorded 175B teacher (D = 1), and a scripted teacher of sums
    on 127.0.0.1 (D = 6, and adaptive) whose samples are wrong, duplicated and too long by seed."""
    sums = sums_task(tmp_path / "sums")
    engine = {"kind": "openai", "model": "sums", "base_url": sums_server, "replicas": 1, "batch_size": 16}
    fixed = {"tasks": [sums], "output_dir": str(tmp_path / "t6"), "progress": False, "engine": engine,
             "sampling": {"num_samples": 6, "max_new_tokens": 64}}
    adaptive = {**fixed, "output_dir": str(tmp_path / "ta"),
                "sampling": {"max_new_tokens": 64, "adaptive": {"min_correct": 2, "max_samples": 6, "round_size": 2}}}
    for teacher in (fixed, adaptive):
        teach(load_config(TeachConfig, base=teacher))
    ma = {"tasks": "multiarith", "teacher": recorded_teacher}
    return {
        "recorded": {**ma, "dev_fraction": 0.1, "max_length": 512},
        "recorded_d1_short": {**ma, "dev_fraction": 0, "max_length": 150, "num_samples": 1},
        "recorded_step_by_step_subset": {**ma, "method": "step_by_step", "train_questions": 0.3, "max_length": 300},
        "vanilla_gold": {"method": "vanilla", "tasks": "multiarith", "dev_fraction": 0},
        "sums_d4_dedupe_short": {"tasks": [sums], "teacher": fixed, "num_samples": 4, "dedupe": True,
                                 "dev_fraction": 0.1, "max_length": 64},
        "sums_d6": {"tasks": [sums], "teacher": fixed, "max_length": 128},
        "sums_adaptive_dedupe": {"tasks": [sums], "teacher": adaptive, "dedupe": True, "max_length": 128},
        "sums_vanilla_of_the_teachers_questions": {"method": "vanilla", "tasks": [sums], "teacher": fixed,
                                                   "train_questions": 20},
    }


def test_curation_output_is_unchanged_on_the_curated_set_fixtures(tmp_path, recorded_teacher, sums_server,
                                                                   tiny_llama, ray_local, monkeypatch):
    """Every case's curated rows (in file order) and stats equal those that fcot's curation of the driver's Python
    loop wrote (commit b1aceee), kept in tests/data/curated_golden.json (FCOT_WRITE_GOLDEN=1 rewrites it). Files
    of at least 100 rows and a block per 16 KiB of formatted parts, so a case spans several files (one or more per
    block of the sort), whose names must give the rows' order."""
    monkeypatch.setattr(fcot.curate, "ROWS_PER_FILE", 100)
    monkeypatch.setattr(fcot.curate, "PART_BYTES", 16 << 10)
    got, files = {}, {}
    for name, case in _golden_cases(tmp_path, recorded_teacher, sums_server, tiny_llama).items():
        summary = curate(load_config(CurateConfig, base={"student": str(tiny_llama),
                                                         "output_dir": str(tmp_path / name), **case}))
        rows = _rows(tmp_path / name / "train")
        files[name] = len(list((tmp_path / name / "train").glob("*.parquet")))
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        got[name] = {"rows": len(rows), "sha256": digest,
                     "summary": {k: v for k, v in summary.items() if k not in VOLATILE}}
    got = json.loads(json.dumps(got, sort_keys=True))  # as the file holds it (JSON keys are strings)
    if os.environ.get("FCOT_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert {n: g["summary"] for n, g in got.items()} == {n: w["summary"] for n, w in want.items()}
    assert got == want
    kinds = {k for g in got.values() for st in g["summary"]["tasks"].values() for k in st if k.startswith("dropped")}
    assert kinds == {"dropped_incorrect", "dropped_duplicate", "dropped_too_long"}  # every rule had work to do
    assert files["recorded"] > 1, files


def _question(predictions, gold=None):
    """One question's formatted rows (one part per sample), as curation's sort hands them to select_block."""
    import pyarrow as pa

    n = len(predictions)
    correct = [None if gold is None else p == gold for p in predictions]
    return pa.table({"task": ["t"] * n, "index": [0] * n, "sample_index": list(range(n)), "part": [0] * n,
                     "weight_key": [""] * n, "prompt": ["q ###"] * n,
                     "completion": [f" r{k} --> {p} END" for k, p in enumerate(predictions)],
                     "length": [10] * n, "completion_length": [6] * n, "correct": correct, "prediction": predictions,
                     "rationale_hash": [f"h{k}" for k in range(n)], "text_hash": [f"h{k}" for k in range(n)],
                     "too_long": [False] * n, "no_rationale": [False] * n})


def _select(group, **rule):
    out = fcot.curate.select_block(group, dev=frozenset(), train=frozenset({("t", 0)}), adaptive=None,
                                   budget=None, num_samples=rule.pop("num_samples", None), dedupe=False, asked=0,
                                   **rule)
    counts = json.loads(out.column("counts")[-1].as_py())["tasks"]["t"]["counts"]
    return out.column("sample_index").to_pylist()[:-1], counts


def test_majority_labels_min_votes_and_filter_all_on_a_hand_computed_question():
    # Samples answer 7, 5, 7, None, 7, 5: the majority is 7 with 3 votes; gold is 5.
    group = _question(["7", "5", "7", None, "7", "5"], gold="5")
    assert _select(group) == ([1, 5], {"samples": 6, "dropped_incorrect": 4, "kept": 2})  # gold, as before
    kept, counts = _select(group, label="majority", min_votes=3)
    assert kept == [0, 2, 4] and counts == {"labeled_questions": 1, "labeled_with_gold": 1,  # label_equals_gold 0
                                            "samples": 6, "dropped_incorrect": 3, "kept": 3}
    kept, counts = _select(group, label="majority", min_votes=4)  # 3 votes are too few: the question is dropped
    assert kept == [] and counts == {"samples": 6, "dropped_unlabeled": 6}
    kept, counts = _select(group, label="majority", keep_all=True)  # every sample with an answer, with its own
    assert kept == [0, 1, 2, 4, 5] and counts["dropped_no_answer"] == 1 and counts["kept_off_label"] == 2
    # The first D samples vote: of 7, 5, the tie goes to the answer reached first; no gold, nothing to compare.
    kept, counts = _select(_question(["7", "5", "7", None, "7", "5"]), label="majority", num_samples=2)
    assert kept == [0] and "labeled_with_gold" not in counts and counts["labeled_questions"] == 1


def test_a_block_of_several_questions_and_tasks_is_selected_per_question_and_counted_per_task():
    """The sort hands select_block whole questions, their rows in any order: it orders them by (task, index, sample,
    part), counts a record stored twice once, keeps no dev question's sample, and counts by task."""
    def question(task, index, predictions, gold):
        q = _question(predictions, gold)
        return q.set_column(0, "task", pa.array([task] * len(q))).set_column(1, "index", pa.array([index] * len(q)))

    block = pa.concat_tables([question("b", 3, ["1", "2"], "2"), question("a", 7, ["5", "5", "4"], "5"),
                              question("a", 2, ["9", "9"], "9")])
    block = pa.concat_tables([block, block.slice(1, 1)])  # b/3's sample 1 stored twice
    block = block.take(pa.array([6, 2, 0, 5, 3, 1, 4, 7]))  # any order
    out = fcot.curate.select_block(block, dev=frozenset({("a", 2)}), train=frozenset({("a", 7), ("b", 3)}),
                                   adaptive=None, budget=None, num_samples=None, dedupe=False, asked=0)
    pairs = out.slice(0, len(out) - 1)
    assert list(zip(*(pairs.column(c).to_pylist() for c in ("task", "index", "sample_index")))) == [
        ("a", 7, 0), ("a", 7, 1), ("b", 3, 1)]
    counts = json.loads(out.column("counts")[-1].as_py())["tasks"]
    assert counts == {"a": {"counts": {"samples": 3, "dev_samples": 2, "dropped_incorrect": 1, "kept": 2},
                            "kept_per_question": {"2": 1}, "completion_length_max": 6},
                      "b": {"counts": {"samples": 2, "dropped_incorrect": 1, "kept": 1},
                            "kept_per_question": {"1": 1}, "completion_length_max": 6}}


def test_a_sample_without_a_rationale_is_dropped_and_counted_not_a_crash(tiny_llama):
    """A teacher that answered without a word of reasoning (a blank rationale, its answer right) gives a rationale
    method no pair: the formatter marks it (it used to raise "needs a rationale" and stop curation), selection drops
    it as dropped_no_rationale. Vanilla learns from the answer alone and keeps it."""
    batch = {"question": ["How many?"] * 2, "gold": ["4", "4"], "correct": [True, True], "prediction": ["4", "4"],
             "rationale": ["Two and two.", "  "]}
    out = fcot.curate.Formatter("fine_tune_cot", str(tiny_llama), 512)(batch)
    assert out["no_rationale"] == [False, True] and out["completion"][1] == ""
    assert fcot.curate.Formatter("vanilla", str(tiny_llama), 512)(batch)["no_rationale"] == [False, False]
    group = _question(["4", "4"], gold="4").drop_columns(["no_rationale"]).append_column(
        "no_rationale", pa.array(out["no_rationale"]))
    assert _select(group) == ([0], {"samples": 2, "dropped_no_rationale": 1, "kept": 1})


def test_a_pair_ends_with_gold_where_the_sample_reached_it_else_with_its_own_answer(tiny_llama):
    f = fcot.curate.Formatter("fine_tune_cot", str(tiny_llama), 512)
    out = f({"question": ["How many?"] * 3, "gold": ["4.0", None, "4.0"], "correct": [True, None, False],
             "prediction": ["4", "6", "3"], "rationale": ["Two and two.", "Three twice.", "Guess."]})
    assert out["completion"] == [" Two and two. --> 4.0 END", " Three twice. --> 6 END", " Guess. --> 3 END"]
