"""Bad input gets one clear error that names the file, record and key — from the CLI, with no traceback."""

import json

import pytest

from fcot.errors import FcotError
from fcot.tasks import load_records, load_split
from tests.conftest import run_fcot


def _edit_multiarith(data_copy, edit):
    path = data_copy / "datasets" / "MultiArith" / "MultiArith.json"
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records))
    return path


def test_missing_key(data_copy):
    path = _edit_multiarith(data_copy, lambda r: r[5].pop("lSolutions"))
    with pytest.raises(FcotError, match=rf"^{path}, record 5, key 'lSolutions': missing$"):
        load_records("multiarith", data_copy)


def test_wrong_type(data_copy):
    path = _edit_multiarith(data_copy, lambda r: r[7].update(sQuestion=42))
    with pytest.raises(FcotError, match=rf"^{path}, record 7, key 'sQuestion': expected str, got int 42$"):
        load_records("multiarith", data_copy)


def test_empty_question(data_copy):
    path = _edit_multiarith(data_copy, lambda r: r[3].update(sQuestion="   "))
    with pytest.raises(FcotError, match=rf"^{path}, record 3, key 'sQuestion': empty$"):
        load_records("multiarith", data_copy)


def test_truncated_json(data_copy):
    path = data_copy / "datasets" / "coin_flip" / "coin_flip.json"
    path.write_text(path.read_text()[:5000])
    with pytest.raises(FcotError, match=rf"^{path}: invalid JSON at line \d+, column \d+"):
        load_records("coin_flip", data_copy)


def test_truncated_jsonl_line(data_copy):
    path = data_copy / "datasets" / "CommonsenseQA" / "dev_rand_split.jsonl"
    lines = path.read_text().splitlines()
    lines[10] = lines[10][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FcotError, match=rf"^{path}, line 11: invalid JSON"):
        load_records("commonsense_qa", data_copy)


def test_unknown_task_from_the_cli(shared_data):
    proc = run_fcot("score", "--task", "multiarithmetic", "--input", "x.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fcot: error: unknown task 'multiarithmetic'; known tasks: single_eq")
    assert "Traceback" not in proc.stderr


def test_split_index_out_of_range(data_copy):
    path = data_copy / "splits" / "svamp__default.json"
    split = json.loads(path.read_text())
    split["test"][4] = 1000
    path.write_text(json.dumps(split))
    with pytest.raises(FcotError, match=r"^task svamp, test split, position 4: index 1000 is out of range 0–999$"):
        load_split("svamp", "test", root=data_copy)


def test_split_file_with_wrong_types(data_copy):
    path = data_copy / "splits" / "svamp__default.json"
    path.write_text(json.dumps({"train": [1, 2], "test": "all"}))
    with pytest.raises(FcotError, match=rf"^{path}, key 'test': expected a list of integer indices$"):
        load_split("svamp", "test", root=data_copy)


def test_missing_data_dir(tmp_path):
    proc = run_fcot("tasks", "--data-dir", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert f"data dir {tmp_path / 'nowhere'} does not exist: run `fcot data download --task " in proc.stderr


def test_unreadable_task_file(data_copy):
    path = data_copy / "datasets" / "MultiArith" / "MultiArith.json"
    path.unlink()
    path.mkdir()  # unreadable as a file, whoever runs the test (root reads any file with mode 000)
    with pytest.raises(FcotError, match=rf"^{path}: cannot read"):
        load_records("multiarith", data_copy)


def test_data_dir_that_is_a_file(tmp_path):
    file = tmp_path / "data"
    file.write_text("not a folder")
    proc = run_fcot("tasks", "--data-dir", file)
    assert proc.returncode == 2 and f"data dir {file} is not a readable directory" in proc.stderr


def test_missing_task_file(data_copy):
    (data_copy / "datasets" / "SVAMP" / "SVAMP.json").unlink()
    message = r"SVAMP/SVAMP.json: file not found \(task svamp\); run `fcot data download --task svamp` or set FCOT_DATA"
    with pytest.raises(FcotError, match=message):
        load_records("svamp", data_copy)


def test_score_input_errors(tmp_path, shared_data):
    src = tmp_path / "c.jsonl"
    cases = [
        ('{"index": 0}\n', f"{src}, line 1, key 'completion': missing"),
        ('{"index": "0", "completion": "x"}\n', f"{src}, line 1, key 'index': expected int, got str"),
        ('{"index": 0, "completion": "x"}\n{"index": 99999, "completion": "x"}\n',
         f"{src}, line 2, key 'index': 99999 is not a record of task multiarith (indices 0–599)"),
        ('{"index": 0, "completion": "x", "answer": "ten"}\n', f"{src}, line 1, key 'answer': 'ten' is not a number"),
        ('{"index": 0, "compl', f"{src}, line 1: invalid JSON"),
    ]
    for text, message in cases:
        src.write_text(text)
        proc = run_fcot("score", "--task", "multiarith", "--input", src)
        assert proc.returncode == 2 and message in proc.stderr, (text, proc.stderr)
        assert not (tmp_path / "c.scored.jsonl").exists()  # nothing half-written
