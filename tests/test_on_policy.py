"""On-policy distillation end to end on the local Ray cluster: a Fine-tune-CoT student of a served teacher of sums,
then rounds in which it samples its own rationales on hf replicas, a teacher (tiny_llama on hf replicas, the
student's tokenizer) grades every rationale token, and the student trains on the reverse KL at them; resumed after
a round lost part of its grades, and extended by a round, without sampling anything twice."""

import json
import os

import pyarrow.parquet as pq
import torch
import yaml

from fcot.contracts.curated import TEACHER_LOGPROBS
from fcot.prompts import zero_shot_cot_step1
from tests.conftest import sums_task


def _config(tmp_path, sums_server, tiny_llama, rounds: int):
    cfg = {"name": "op", "output_dir": str(tmp_path / "op"), "tasks": ["sums"], "baselines": [],
           "methods": ["fine_tune_cot", "on_policy"], "wandb_mode": "disabled",
           "user_tasks": [sums_task(tmp_path / "data", 24)],
           "teacher": {"progress": False, "engine": {"kind": "openai", "model": "sums", "base_url": sums_server,
                                                     "tokenizer": str(tiny_llama)}},
           "curate": {"max_length": 256},
           "train": {"model": str(tiny_llama), "epochs": 1, "batch_size": 4, "num_workers": 1},
           "eval": {"subset": 4, "max_new_tokens": 8, "engine": {"batch_size": 8}},
           "on_policy": {"rounds": rounds, "samples_per_question": 2, "max_new_tokens": 12, "lr": 1e-3,
                         "teacher": {"kind": "hf", "model": str(tiny_llama), "batch_size": 8}}}
    path = tmp_path / f"op{rounds}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _shards(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_on_policy_rounds_grade_the_students_own_tokens_and_resume_without_sampling_twice(tmp_path, tiny_llama,
                                                                                         sums_server, ray_local):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.config import load_config
    from fcot.run import RunConfig, run

    run(load_config(RunConfig, _config(tmp_path, sums_server, tiny_llama, rounds=1), []))
    root = tmp_path / "op"
    one = root / "rollouts" / "on_policy" / "round_1"
    questions = [json.loads(line) for line in (root / "curated" / "on_policy" / "train_questions.jsonl").open()]
    stats = json.loads((one / "stats.json").read_text())
    assert stats["samples"] == 2 * len(questions) > 0 and stats["graded_tokens"] > 0
    samples = pq.read_table(one / "samples").to_pylist()
    assert len({s["seed"] for s in samples}) == len(samples)  # a seed per sample
    # The round starts from the Fine-tune-CoT student: its content keys the samples.
    from fcot.models import fingerprint

    assert {s["student"] for s in samples} == {fingerprint(str(root / "students" / "fine_tune_cot" / "model"))}

    # Every training row's graded tokens are the student's own sampled ones, each with the teacher's logprob of it
    # under the teacher's zero-shot-CoT prompt: checked against the teacher model's forward pass here.
    rows = pq.read_table(one / "train").to_pylist()
    by_prompt = {(s["task"], s["index"], s["sample_index"]): s for s in samples}
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for row in rows[:4]:
        s = by_prompt[(row["task"], row["index"], row["sample_index"])]
        graded = row[TEACHER_LOGPROBS]
        k = s["rationale_tokens"]
        assert graded["tokens"] == s["tokens"][:k] and [ids[0] for ids in graded["top_ids"]] == graded["tokens"]
        prompt = tok(zero_shot_cot_step1(s["question"]), add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + graded["tokens"]])).logits[0].float()
        want = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(graded["tokens"])[:, None])
        got = torch.tensor([lps[0] for lps in graded["top_logprobs"]])
        torch.testing.assert_close(got, want[:, 0], atol=2e-2, rtol=1e-2)  # float16 in the store
    trained = json.loads((root / "stages" / "train-on_policy-1.json").read_text())["result"]
    assert trained["objective"] == "on_policy" and trained["steps"] == len(rows) // 4 > 0
    report = (root / "report.md").read_text()
    assert "## On-policy rounds" in report and "| on_policy | 1 | " in report
    assert "on-policy distillation" in report  # its test accuracy beside the others

    # A round killed after its samples and part of its grades: the rerun grades what is missing and samples nothing;
    # with rounds: 2, the first round's training is kept and the second samples from its student.
    sampled = _shards(one / "samples")
    lost = sorted((one / "grades").glob("*.parquet"))[0]
    lost.unlink()
    (root / "stages" / "rollout-on_policy-1.json").unlink()
    summary = run(load_config(RunConfig, _config(tmp_path, sums_server, tiny_llama, rounds=2), []))
    assert _shards(one / "samples") == sampled  # nothing sampled twice
    assert lost.exists()  # regraded, the same batch under the same name
    assert "train-on_policy-1" in summary["order"]
    assert json.loads((root / "stages" / "train-on_policy-1.json").read_text())["result"] == trained  # kept
    two = pq.read_table(root / "rollouts" / "on_policy" / "round_2" / "samples").to_pylist()
    assert {s["student"] for s in two} == {fingerprint(str(root / "students" / "on_policy" / "round_1" / "model"))}
    evaluated = json.loads((root / "stages" / "eval-on_policy.json").read_text())["result"]
    assert evaluated["model"].endswith(os.path.join("on_policy", "round_2", "model"))
    assert "| on_policy | 2 | " in (root / "report.md").read_text()


def test_a_worker_node_lost_mid_rollout_samples_and_grades_the_same(tmp_path, tiny_llama, lose_a_node):
    """On a ray.cluster_utils.Cluster (a head without CPUs, two one-CPU worker nodes), a rollout runs once
    undisturbed and once with the node of a student replica removed without grace while it samples, and no node
    added: Ray Data retries the lost batch on the replica left, and the round's rows (its samples, the teacher's
    grades) are the same."""
    from fcot.tasks import load_split

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in load_split("multiarith", "train")[:40]))

    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "questions": str(questions), "tasks": ["multiarith"], "samples_per_question": 2, "max_new_tokens": 24,
            "student": {"model": str(tiny_llama), "replicas": 2, "batch_size": 2},
            "teacher": {"model": str(tiny_llama), "replicas": 2, "batch_size": 8},
            "output_dir": str(tmp_path / name)}))
        return path

    out = lose_a_node("rollout", config("lost"), reference=config("undisturbed"), replace=False)
    assert out["at_loss"]["victim_found"], out["at_loss"]
    assert out["result"]["samples"] == out["reference"]["samples"] == 80

    def rows(name):
        return sorted(pq.read_table(tmp_path / name / "train").to_pylist(),
                      key=lambda r: (r["task"], r["index"], r["sample_index"]))

    lost, undisturbed = rows("lost"), rows("undisturbed")
    assert [(r["index"], r["sample_index"], r["completion"], r[TEACHER_LOGPROBS]["tokens"]) for r in lost] == \
        [(r["index"], r["sample_index"], r["completion"], r[TEACHER_LOGPROBS]["tokens"]) for r in undisturbed]
    for a, b in zip(lost, undisturbed):  # graded in other batches: float16 logprobs alike
        torch.testing.assert_close(torch.tensor(a[TEACHER_LOGPROBS]["top_logprobs"]),
                                   torch.tensor(b[TEACHER_LOGPROBS]["top_logprobs"]), atol=2e-2, rtol=1e-2)
    samples = pq.read_table(tmp_path / "lost" / "samples").column("key").to_pylist()
    assert len(samples) == len(set(samples)) == 80  # a retried batch rewrote its own shard: no sample twice
