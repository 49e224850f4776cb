import json

import pytest

from fcot.errors import FcotError
from fcot.scoring import score
from fcot.tasks import generate_coin_flip, generate_last_letters, jsonl_task, load_records, load_split, task_sizes
from tests.conftest import run_fcot


def test_generators_are_seeded_and_correct():
    assert generate_coin_flip(50, seed=3) == generate_coin_flip(50, seed=3)
    assert generate_coin_flip(50, seed=3) != generate_coin_flip(50, seed=4)
    for rec in generate_coin_flip(2000, seed=1):
        flips = rec["question"].count(" flips the coin.")
        assert rec["answer"] == ("yes" if flips % 2 == 0 else "no")
    answers = {r["answer"] for r in generate_coin_flip(200, seed=1)}
    assert answers == {"yes", "no"}
    for rec in generate_last_letters(500, seed=2, n_words=3):
        names = rec["question"].split('"')[1].split()
        assert len(names) == 3 and rec["answer"] == "".join(n[-1] for n in names)


def test_generated_task_loads_and_scores(tmp_path):
    out = tmp_path / "coins.jsonl"
    run_fcot("data", "generate", "coin_flip", "--n", "1000", "--seed", "7", "--output", out, check=True)
    jsonl_task("coins_1k", out, answer_type="yes_no", test_fraction=0.2)
    assert task_sizes("coins_1k") == {"train": 800, "test": 200}
    sample = load_split("coins_1k", "test")[0]
    assert score("coins_1k", f"--> {sample.answer} END", sample.answer, prefix="-->").correct


def test_user_task_with_field_mapping_and_choices(tmp_path):
    rows = [{"q": {"text": f"Pick the color of item {i}"}, "options": ["red", "green", "blue"], "gold": "green"}
            for i in range(10)]
    path = tmp_path / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": list(range(7)), "test": [7, 8, 9]}))
    jsonl_task("colors", path, question_key="q.text", answer_key="gold", answer_type="letter",
               choices_key="options", split_file=split)
    first = load_records("colors")[0]
    assert first.question == "Pick the color of item 0 Answer choices: (A) red, (B) green, (C) blue."
    assert first.answer == "B" and [s.index for s in load_split("colors", "test")] == [7, 8, 9]
    assert score("colors", "so (B)", "B").correct


def test_user_task_bad_input(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "What is 1+1?", "answer": 2}\n{"question": "", "answer": 3}\n')
    with pytest.raises(FcotError, match=rf"^{path}, line 2, key 'question': empty$"):
        jsonl_task("t1", path, answer_type="number")
    path.write_text('{"question": "What is 1+1?", "answer": "two"}\n')
    with pytest.raises(FcotError, match=rf"^{path}, line 1, key 'answer': expected a number, got 'two'$"):
        jsonl_task("t2", path, answer_type="number")
    with pytest.raises(FcotError, match="key 'answer_type': expected one of number, letter, yes_no, text"):
        jsonl_task("t3", path, answer_type="float")
    with pytest.raises(FcotError, match="task name 'multiarith' is taken by a built-in task"):
        jsonl_task("multiarith", path, answer_type="text")


def test_a_user_task_reads_the_same_from_every_format_datasets_loads(tmp_path, shared_data):
    import datasets

    examples = json.loads((shared_data / "datasets" / "coin_flip" / "coin_flip.json").read_text())["examples"][:30]
    rows = [{"problem": e["question"], "solution": e["answer"]} for e in examples]
    rows[3]["solution"] = None  # a question without its gold answer (teacher-labeled curation may take it)
    (tmp_path / "coins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "coins.csv", index=False)
    ds.to_parquet(tmp_path / "coins.parquet")
    ds.to_json(tmp_path / "coins.json", lines=False)
    ds.save_to_disk(tmp_path / "coins_saved")
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "coins_dict")
    keys = {"question_key": "problem", "answer_key": "solution", "answer_type": "yes_no"}
    expected = [(s.index, s.question, s.answer) for s in load_records(jsonl_task("coins_jsonl", tmp_path /
                                                                                 "coins.jsonl", **keys).name)]
    assert len(expected) == 30 and expected[3][2] is None and expected[0][2] in ("yes", "no")
    for name in ("coins.csv", "coins.parquet", "coins.json", "coins_saved", "coins_dict"):
        task = jsonl_task(f"coins_{name.replace('.', '_')}", tmp_path / name, **keys)
        assert [(s.index, s.question, s.answer) for s in load_records(task.name)] == expected, name
    assert "row 4, key 'solution'" in task.extra["unanswered"][3]

    # A bad row of a CSV file is named as a row, as a bad line of a JSONL file is named as a line.
    rows[7]["solution"] = "maybe"
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FcotError, match=rf"^{tmp_path / 'bad.csv'}, row 8, key 'solution': expected yes or no, "
                                        rf"got 'maybe'$"):
        jsonl_task("bad_csv", tmp_path / "bad.csv", **keys)
    (tmp_path / "coins.xlsx").write_text("not read")
    with pytest.raises(FcotError, match=r"coins.xlsx: a user task's file is JSONL or what `datasets` reads"):
        jsonl_task("xlsx", tmp_path / "coins.xlsx", **keys)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(tmp_path / "two")
    with pytest.raises(FcotError, match=r"two: a dataset of 2 splits \(train, test\): set path to one split's"):
        jsonl_task("two", tmp_path / "two", **keys)
