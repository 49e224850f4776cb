"""Adaptive diverse reasoning: the stopping rule, and the teacher's pool sampling each question in rounds until it
has enough correct rationales — killed mid-way and resumed without repeating a finished sample, then extended
(a larger min_correct) generating only what is missing."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from fcot.contracts.records import RecordStore
from fcot.contracts.teacher import AdaptiveConfig, samples_used
from tests.conftest import ROOT, run_fcot, sums_task
from tests.test_run import _kill_tree


def _rec(correct: bool, text: str = "a rationale") -> dict:
    return {"correct": correct, "rationale": text}


def test_the_stopping_rule_replays_from_the_records():
    rule = AdaptiveConfig(min_correct=2, max_samples=8, round_size=2)
    assert samples_used({}, rule, 8) == 2  # the first round, being generated
    assert samples_used({0: _rec(True, "a"), 1: _rec(True, "b")}, rule, 8) == 2  # two distinct correct: done
    assert samples_used({0: _rec(True, "a"), 1: _rec(True, " a ")}, rule, 8) == 4  # one rationale twice: one
    assert samples_used({0: _rec(True, "a"), 1: _rec(False), 2: _rec(False), 3: _rec(True, "b")}, rule, 8) == 4
    assert samples_used({0: _rec(False)}, rule, 8) == 2  # a round counts whole once asked for
    assert samples_used({k: _rec(False) for k in range(8)}, rule, 8) == 8  # never enough: the budget
    assert samples_used({k: _rec(False) for k in range(8)}, None, 5) == 5  # a fixed D spends all of it


def _spent(records_dir, rule) -> dict:
    by_q: dict = {}
    for r in RecordStore(records_dir).read().to_pylist():
        by_q.setdefault(r["index"], {})[r["sample_index"]] = r
    return {q: samples_used(recs, rule, rule.max_samples) for q, recs in by_q.items()}


@pytest.mark.slow
def test_adaptive_teacher_stops_early_resumes_after_a_kill_and_extends(tmp_path, sums_server, ray_local):
    """The scripted teacher of sums on 127.0.0.1 (tests/conftest.py: by seed a wrong sum, a rationale two seeds
    share, or a distinct right one), answering slowly enough to be killed mid-run: two distinct right rationales per
    question are asked, so some questions stop after their first round and others go on."""
    cfg = {"tasks": [sums_task(tmp_path / "sums")], "subset": 16, "output_dir": str(tmp_path / "teacher"),
           "progress": False, "engine": {"kind": "openai", "model": "sums", "base_url": f"{sums_server}/slow",
                                         "replicas": 1, "batch_size": 4},
           "sampling": {"max_new_tokens": 64, "adaptive": {"min_correct": 2, "max_samples": 6, "round_size": 2}}}
    config = tmp_path / "teach.yaml"
    config.write_text(yaml.safe_dump(cfg))
    records = tmp_path / "teacher" / "records"
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "teach", str(config)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while len(list(records.glob("*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    _kill_tree(proc)
    done = RecordStore(records).keys()
    assert done, "no shard was written before the kill"

    finished = json.loads(run_fcot("teach", config, check=True, cluster=ray_local).stdout.strip().splitlines()[-1])
    after = RecordStore(records).keys()
    assert done < after and finished["generated"] == len(after) - len(done)  # nothing finished was redone
    rule = AdaptiveConfig(min_correct=2, max_samples=6, round_size=2)
    spent = _spent(records, rule)
    assert len(spent) == 16 and finished["records"] == sum(spent.values()) == len(after)
    per_q = finished["tasks"]["sums"]["samples_per_question"]
    assert sum(per_q.values()) == 16 and "2" in per_q and len(per_q) > 1  # some stopped at once, some went on

    again = json.loads(run_fcot("teach", config, check=True, cluster=ray_local).stdout.strip().splitlines()[-1])
    assert again["generated"] == 0

    cfg["sampling"]["adaptive"]["min_correct"] = 3  # ask more of every question: only the missing samples
    config.write_text(yaml.safe_dump(cfg))
    more = json.loads(run_fcot("teach", config, check=True, cluster=ray_local).stdout.strip().splitlines()[-1])
    grown = RecordStore(records).keys()
    assert after <= grown and more["generated"] == len(grown) - len(after) > 0
    assert more["records"] == sum(_spent(records, AdaptiveConfig(min_correct=3, max_samples=6, round_size=2)).values())
