"""Importing teacher outputs written elsewhere: the Zero-shot-CoT logs and OpenAI Batch API files."""

import json

import pytest

from fcot.config import load_config
from fcot.contracts.records import RecordStore
from fcot.contracts.teacher import TeachConfig
from fcot.errors import FcotError
from fcot.teacher.pipeline import teach
from fcot.teacher.recorded import write_batch_requests


def _cfg(tmp_path, **engine):
    return load_config(TeachConfig, base={"tasks": "multiarith", "subset": 3, "output_dir": str(tmp_path / "t"),
                                          "progress": False,
                                          "engine": {"kind": "recorded", "model": "gpt-x", **engine}})


def test_zero_shot_cot_log_import_matches_questions_and_gold(tmp_path, shared_data):
    cfg = load_config(TeachConfig, base={
        "tasks": "date_understanding", "output_dir": str(tmp_path / "t"), "progress": False,
        "engine": {"kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
                   "path": str(shared_data / "teacher_logs" / "date_understanding_zero_shot_cot.log")}})
    summary = teach(cfg)
    t = summary["tasks"]["date_understanding"]
    assert t["samples"] == t["questions"] == 258  # every train question found in the log
    # The log scored 67.5% over all 369; fcot maps its letters through the choice texts to its own order.
    assert 0.6 < t["accuracy_greedy"] < 0.75
    assert teach(cfg)["records"] == 258  # a second import adds nothing


def test_openai_batch_round_trip(tmp_path, shared_data):
    step1_in = write_batch_requests(_cfg(tmp_path, format="openai_batch", path="unused"), tmp_path / "step1.jsonl")
    requests = [json.loads(line) for line in step1_in.read_text().splitlines()]
    assert len(requests) == 3 and requests[0]["url"] == "/v1/completions"
    assert requests[0]["body"]["prompt"].endswith("\nA: Let's think step by step.")
    # What the Batch API returns for those requests (written here as the service would):
    outputs = []
    for r in requests:
        outputs.append({"custom_id": r["custom_id"], "error": None, "response": {"status_code": 200, "body": {
            "model": "gpt-x", "usage": {"prompt_tokens": 40, "completion_tokens": 20},
            "choices": [{"text": " They had 10 and got 5 more, so 15.", "finish_reason": "stop"}]}}})
    out1 = tmp_path / "step1_out.jsonl"
    out1.write_text("".join(json.dumps(o) + "\n" for o in outputs))
    step2_in = write_batch_requests(_cfg(tmp_path, format="openai_batch", path="unused"), tmp_path / "step2.jsonl",
                                    step1_output=out1)
    step2 = [json.loads(line) for line in step2_in.read_text().splitlines()]
    assert step2[0]["body"]["prompt"].endswith("so 15.\nTherefore, the answer is")
    for r in step2:
        outputs.append({"custom_id": r["custom_id"], "error": None, "response": {"status_code": 200, "body": {
            "choices": [{"text": " 15.", "finish_reason": "stop"}], "usage": {}}}})
    both = tmp_path / "both_out.jsonl"
    both.write_text("".join(json.dumps(o) + "\n" for o in outputs))
    summary = teach(_cfg(tmp_path, format="openai_batch", path=str(both)))
    assert summary["records"] == 3
    rows = RecordStore(tmp_path / "t" / "records").read().to_pylist()
    assert {r["prediction"] for r in rows} == {"15"} and all(r["answer_text"] == " 15." for r in rows)


def test_openai_batch_errors_name_the_line(tmp_path):
    bad = tmp_path / "out.jsonl"
    bad.write_text('{"custom_id": "req-1", "response": {"status_code": 200}}\n')
    with pytest.raises(FcotError, match=rf"{bad}, line 1, key 'custom_id': expected fcot/TASK/INDEX/SAMPLE/step1\|2"):
        teach(_cfg(tmp_path, format="openai_batch", path=str(bad)))
