import json

import pytest

from fcot.scoring import predict, score
from fcot.tasks import get_task
from tests.conftest import run_fcot


def test_prefix_rule_first_after_prefix_last_without_it_first_with_none():
    spec = get_task("multiarith")
    text = "She had 5 apples and ate 2, so 3 are left. --> 3 END and 7"
    assert predict(spec, text, "-->")[0] == "3"
    assert predict(spec, "5 apples minus 2 is 3", "-->")[0] == "3"  # prefix missing: last candidate
    assert predict(spec, "5 apples minus 2 is 3", None)[0] == "5"  # no prefix: first candidate
    assert predict(spec, "no numbers here", "-->")[0] is None


def test_numbers_commas_and_float_tolerance():
    assert score("gsm8k", "--> 1,000 END", "1000", prefix="-->").correct
    assert not score("gsm8k", "--> 1000.0", "1000", prefix="-->").correct  # exact match outside float tasks
    assert score("svamp", "--> 1000.0000000001", "1000", prefix="-->").correct  # tolerance 1e-6
    assert not score("svamp", "--> 1000.01", "1000", prefix="-->").correct
    assert score("addsub", "-5.5 is it", "-5.5").correct


@pytest.mark.parametrize("task,text,expected", [
    ("aqua", "the answer is (E)", "E"),
    ("aqua", "the answer is F then A", "A"),  # F is no AQuA letter
    ("date_understanding", "(F) 05/01/2021", "F"),
    ("tracking_shuffled_objects", "Dave has the D; so C", "C"),
    ("commonsense_qa", "Bob picks E", "B"),  # the paper's regex takes any capital A–E, even inside words
])
def test_letter_ranges(task, text, expected):
    assert predict(get_task(task), text, None)[0] == expected


def test_yes_no_and_last_letters():
    assert predict(get_task("coin_flip"), "No, it is not. Yes.", None)[0] == "no"
    assert predict(get_task("strategy_qa"), "Thus: yes.", None)[0] == "yes"
    assert score("strategy_qa", "--> Yes", "Yes", prefix="-->").correct
    assert predict(get_task("last_letter_concatenation"), ' "ny a".\n', None)[0] == "nya"


def test_metrics():
    s = score("multiarith", "I think 4 or 9", "9", prefix="-->", finish_reason="length")
    assert (s.correct, s.contains_answer, s.correct_format, s.complete) == (True, True, False, False)
    s = score("multiarith", "--> 4 or 9", "9", prefix="-->", finish_reason="stop")
    assert (s.correct, s.contains_answer, s.correct_format, s.complete) == (False, True, True, True)


def test_fcot_score_command(tmp_path, shared_data):
    lines = [
        {"index": 0, "completion": "They had 74 and ate 35 --> 39 END", "finish_reason": "stop"},
        {"index": 1, "completion": "--> 7 END"},
        {"index": 1, "completion": "--> 7 END", "answer": "7"},
        {"index": 2, "completion": "I am not sure"},
    ]
    src = tmp_path / "completions.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_fcot("score", "--task", "multiarith", "--input", src, "--prefix=-->", check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == "multiarith" and summary["n"] == 4
    assert summary["accuracy"] == 0.5 and summary["correct_format"] == 0.75
    results = [json.loads(line) for line in (tmp_path / "completions.scored.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in results] == [True, False, True, False]
    assert results[0]["complete"] is True and results[1]["complete"] is None

    out = tmp_path / "elsewhere.jsonl"
    run_fcot("score", "--task", "multiarith", "--input", src, "--method", "fine_tune_cot", "--output", out, check=True)
    assert len(out.read_text().splitlines()) == 4


def test_bootstrap_intervals_of_20000_questions_hold_32_mb_not_640_and_give_the_same_numbers():
    """The resampled indices are drawn a few rows at a time (fcot.stats): drawn at once, 2,000 x 20,000 of them and
    their values took 640 MB of the driver's memory at evaluation's end. The numbers are those of one draw."""
    import tracemalloc

    import numpy as np

    from fcot.stats import RESAMPLES, accuracy_interval, paired_difference

    rng = np.random.default_rng(1)
    a, b = (rng.random(20_000) < 0.4).astype(float), (rng.random(20_000) < 0.5).astype(float)
    tracemalloc.start()
    got = accuracy_interval(a), paired_difference(a, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6, f"{peak / 1e6:.0f} MB"
    idx = np.random.default_rng(0).integers(0, a.size, size=(RESAMPLES, a.size))  # one draw, as before
    assert got[0] == tuple(np.percentile(a[idx].mean(axis=1), [2.5, 97.5]))
    assert got[1][1:] == tuple(np.percentile(a[idx].mean(axis=1) - b[idx].mean(axis=1), [2.5, 97.5]))
