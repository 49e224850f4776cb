import json
import re

import pytest

from fcot.errors import FcotError
from fcot.tasks import TASKS, load_records, load_split, split_indices, task_sizes
from tests.conftest import run_fcot

PAPER_SIZES = {
    "addsub": (276, 119), "coin_flip": (350, 150), "commonsense_qa": (9741, 1221), "date_understanding": (258, 111),
    "gsm8k": (7473, 1319), "last_letter_concatenation": (350, 150), "multiarith": (420, 180), "single_eq": (356, 152),
    "strategy_qa": (1603, 687), "svamp": (700, 300), "tracking_shuffled_objects": (525, 225), "aqua": (None, 254),
}


def test_registry_has_the_papers_12_tasks():
    assert set(TASKS) == set(PAPER_SIZES)


@pytest.mark.parametrize("task", sorted(PAPER_SIZES))
def test_split_sizes_match_the_paper(task, shared_data):
    train, test = PAPER_SIZES[task]
    assert task_sizes(task) == {"train": train, "test": test}
    split = split_indices(task)
    assert not set(split["train"]) & set(split["test"])
    for s in load_split(task, "test"):
        assert s.task == task and s.question.strip() == s.question and s.question and s.answer


@pytest.mark.parametrize("task", ["multiarith", "date_understanding"])
def test_template_splits(task, shared_data):
    split = split_indices(task, "template")
    assert not set(split["train"]) & set(split["test"])
    assert len(load_split(task, "train", "template")) == len(split["train"])


def test_fcot_tasks_prints_every_task_with_sizes(shared_data):
    out = run_fcot("tasks", check=True).stdout
    for task, (train, test) in PAPER_SIZES.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(task + " "))
        assert re.search(rf"\s{train if train else '—'}\s+{test}\s", line), line


def test_answers_are_normalised(shared_data):
    multiarith = load_records("multiarith")
    assert multiarith[0].answer == "39" and multiarith[0].index == 0  # lSolutions 39.0 -> "39"
    gsm8k = {s.index: s for s in load_records("gsm8k")}
    assert gsm8k[7473].answer == "18"  # first test question; answer after '####'
    assert all("," not in s.answer for s in gsm8k.values())
    assert {s.answer for s in load_records("strategy_qa")} == {"yes", "no"}
    assert {s.answer for s in load_records("coin_flip")} == {"yes", "no"}


def test_multiple_choice_is_verbalised(shared_data):
    csqa = {s.index: s for s in load_records("commonsense_qa")}
    assert csqa[9741].question == ("A revolving door is convenient for two direction travel, but it also serves as a "
                                  "security measure at a what? Answer choices: (A) bank, (B) library, "
                                  "(C) department store, (D) mall, (E) new york.")
    assert csqa[9741].answer == "A" and csqa[9741].choices[0] == "bank"
    objects = load_records("tracking_shuffled_objects")[0]
    assert objects.question.endswith("At the end of the game, Alice has the \nWhich choice is true? "
                                     "Answer choices: (A) orange ball, (B) white ball, (C) blue ball.")
    assert objects.answer == "C"
    aqua = load_records("aqua")[0]
    assert aqua.index == 97467 and "Answer choices: (A) 5(√3 + 1), (B) 6(√3 + √2)," in aqua.question


def test_date_choices_are_shuffled_deterministically(shared_data):
    from fcot.tasks.loading import _load

    first = load_records("date_understanding")
    _load.cache_clear()
    again = load_records("date_understanding")
    assert [s.question for s in first] == [s.question for s in again]
    # The source lists the right date first; after the shuffle the answers spread over the letters.
    letters = {s.answer for s in first}
    assert len(letters) == 6
    assert first[0].question.startswith("Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?\n"
                                        "Which choice is true? Answer choices: (A) ")
    assert first[0].choices[ord(first[0].answer) - ord("A")] == "05/01/2021"


def test_aqua_train_needs_its_file(shared_data):
    from fcot.errors import FcotError

    with pytest.raises(FcotError, match=r"aqua, train split needs datasets/AQuA/train.json .*fcot data download"):
        load_split("aqua", "train")
    assert len(load_split("aqua", "test")) == 254


def test_the_quickstarts_files_ship_with_fcot_byte_for_byte_as_published():
    """What `fcot data download --task coin_flip` would fetch, pinned by the same sha256."""
    import hashlib

    from fcot.tasks.download import _planned
    from fcot.tasks.loading import BUNDLED

    planned = _planned(["coin_flip"], None)
    assert len(planned) == 3
    for rel, _url, sha in planned:
        assert hashlib.sha256((BUNDLED / rel).read_bytes()).hexdigest() == sha, rel


def test_coin_flip_needs_no_data_dir_and_a_data_dir_that_has_a_file_wins(tmp_path, monkeypatch, data_copy):
    from fcot.contracts.teacher import TeachConfig
    from fcot.tasks.loading import _load

    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("FCOT_DATA_DIR", str(nowhere))
    assert task_sizes("coin_flip") == {"train": 350, "test": 150}
    engine = TeachConfig(tasks=["coin_flip"], engine={"kind": "recorded", "log": "coin_flip"}).engine
    assert engine.path.endswith("fcot/data/bundled/teacher_logs/coin_flip_zero_shot_cot.log")
    # A task fcot does not ship names the command that fetches it, for its questions and its recorded log.
    fix = "run `fcot data download --task svamp` or set FCOT_DATA_DIR to a data dir that has it"
    with pytest.raises(FcotError, match=re.escape(f"data dir {nowhere} does not exist: {fix}")):
        load_split("svamp", "train")
    with pytest.raises(FcotError, match=re.escape(f"{nowhere}/teacher_logs/svamp_zero_shot_cot.log: file not found; "
                                                  f"{fix}")):
        TeachConfig(tasks=["svamp"], engine={"kind": "recorded", "log": "svamp"})
    # The data dir's own copy is read where it has one: here a split with the first two test questions swapped.
    path = data_copy / "splits" / "coin_flip__default.json"
    split = json.loads(path.read_text())
    split["test"][:2] = split["test"][1::-1]
    path.write_text(json.dumps(split))
    _load.cache_clear()
    assert [s.index for s in load_split("coin_flip", "test", root=data_copy)][:2] == split["test"][:2]
    assert split_indices("coin_flip", root=nowhere)["test"][:2] == split["test"][1::-1]
