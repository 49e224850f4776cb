"""User tasks: any JSONL file (or any file `datasets` reads: CSV, Parquet, JSON, Arrow, a `save_to_disk` folder) as a
task, by a field mapping and an answer type.

In Python, `jsonl_task(name, path, ...)` registers a task in this process. In configs, an entry of `tasks`
may be a definition instead of a name, with the same options:

    tasks:
      - {name: units, path: data/units.jsonl, question_key: problem, answer_key: solution, answer_type: number}

A config keeps the definitions of its user tasks in `user_tasks` (names stay in `tasks`), also for tasks
registered with `jsonl_task` in the process that built the config. Validating a config registers them, so the
definition travels with the config to every Ray worker (actors, Train workers, Tune trials, a cluster job),
and a user task runs wherever a paper task does. Registering reads nothing; the file is read (and checked,
record by record) when a split is loaded, which the driver does before any Ray work starts.

A record may lack its answer (the key absent or null): the question has no gold answer. Only a training
question may, and only where the teacher labels it (curate.label: majority); whatever needs gold (evaluation,
gold-labeled curation) stops naming the record's file, line and key (fcot.tasks.loading.require_gold).
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from fcot.config import Config, PathStr
from fcot.errors import FcotError
from fcot.io import iter_jsonl, read_json
from fcot.tasks.loading import get_task, register_task, user_task_definition
from fcot.tasks.registry import TASKS, AnswerType, Sample, SourceFile, TaskSpec, number_string, verbalise

LETTERS = "ABCDEFGHIJ"
ANSWER_TYPES = ("number", "letter", "yes_no", "text")


class UserTask(Config):
    """A task from a JSONL file, or any file `datasets` reads (the options of `jsonl_task`)."""

    name: str = Field(min_length=1)
    path: PathStr
    question_key: str = "question"  # dotted keys reach into objects: question.stem
    answer_key: str = "answer"
    answer_type: Literal["number", "letter", "yes_no", "text"] = "text"
    choices_key: str | None = None  # a list of choice texts (answer_type letter)
    split_file: PathStr | None = None  # {"train": [indices], "test": [indices]}; default: a seeded random split
    test_fraction: float = Field(0.3, gt=0, lt=1)
    seed: int = 0

    def register(self) -> TaskSpec:
        return jsonl_task(**self.model_dump(), check=False)


def _answer(obj: dict, dotted: str):
    """The record's answer, None where the key is absent or null."""
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return value


def _get(obj: dict, dotted: str, path: Path, line: int):
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise FcotError(f"{path}, {line}, key {dotted!r}: missing")
        value = value[part]
    return value


# What `datasets` reads a user task's file as, by suffix; a folder is one written by `Dataset.save_to_disk`.
BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".arrow": "arrow"}


def records(path: Path):
    """(where, record) for each record of a user task's file, `where` as one points at it: JSONL ("line 8", as an
    editor numbers lines); any other file `datasets` reads (CSV, TSV, Parquet, JSON, Arrow) or a `save_to_disk`
    folder ("row 8", from 1)."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        for line, rec in iter_jsonl(path):
            yield f"line {line}", rec
        return
    for row, rec in enumerate(_dataset(path), 1):
        yield f"row {row}", rec


def _dataset(path: Path):
    import datasets  # heavy: a user task's file that is not JSONL

    datasets.disable_progress_bars()
    builder = "load_from_disk" if path.is_dir() else BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FcotError(f"{path}: a user task's file is JSONL or what `datasets` reads "
                        f"({', '.join(BUILDERS)}, or a save_to_disk folder), not {path.suffix or 'no suffix'}")
    try:
        if builder != "load_from_disk":
            return datasets.load_dataset(builder, data_files=str(path), split="train",
                                         **({"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}))
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # whatever the format's reader raises: the file and the reader, in one line
        raise FcotError(f"{path}: cannot read it with datasets ({builder}): {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise FcotError(f"{path}: a dataset of {len(ds)} splits ({', '.join(ds)}): set path to one split's "
                            f"folder, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return ds


def _check_options(name: str, answer_type: str, choices_key: str | None) -> None:
    """A user task's options that need no file: a known answer type, choices only with letters, no built-in name."""
    if answer_type not in ANSWER_TYPES:
        raise FcotError(f"task {name}, key 'answer_type': expected one of {', '.join(ANSWER_TYPES)}, "
                        f"got {answer_type!r}")
    if choices_key and answer_type != "letter":
        raise FcotError(f"task {name}: 'choices_key' needs answer_type 'letter', got {answer_type!r}")
    if name in TASKS:
        raise FcotError(f"task name {name!r} is taken by a built-in task")


def _question(rec: dict, key: str, file: Path, line: str) -> str:
    """The record's question: a non-empty string."""
    q = _get(rec, key, file, line)
    if not isinstance(q, str):
        raise FcotError(f"{file}, {line}, key {key!r}: expected str, got {type(q).__name__}")
    if not q.strip():
        raise FcotError(f"{file}, {line}, key {key!r}: empty")
    return q


def _choices(rec: dict, key: str, file: Path, line: str) -> list[str]:
    """The record's choice texts: a list of 2 to 10 strings (one per letter)."""
    choices = _get(rec, key, file, line)
    if (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
            or not 2 <= len(choices) <= len(LETTERS)):
        raise FcotError(f"{file}, {line}, key {key!r}: expected a list of 2–{len(LETTERS)} strings")
    return choices


def _gold(a: str | None, answer_type: str, choices: tuple | None, file: Path, line: str, key: str) -> str | None:
    """The record's answer (None: no gold) in its answer type's form: a number string, yes or no, a choice letter,
    or any non-empty text."""
    if a is not None and answer_type == "number":
        a = number_string(a, path=f"{file}, {line}", key=key)
    elif a is not None and answer_type == "yes_no":
        a = a.lower().rstrip(".")
        if a not in ("yes", "no"):
            raise FcotError(f"{file}, {line}, key {key!r}: expected yes or no, got {a!r}")
    elif a is not None and answer_type == "letter" and a not in (LETTERS[: len(choices)] if choices else LETTERS):
        raise FcotError(f"{file}, {line}, key {key!r}: expected a choice letter, got {a!r}")
    if a == "":
        raise FcotError(f"{file}, {line}, key {key!r}: empty")
    return a


def _read_user_task(spec: TaskSpec, file: Path, first: int, *, question_key: str, answer_key: str,
                    answer_type: str, choices_key: str | None) -> list[Sample]:
    """A user task's reader: a Sample per record of `file`, indexed from `first`; a record without its answer is
    noted in spec.extra["unanswered"]; a bad record raises FcotError naming the file, its line (or row) and key."""
    out = []
    for line, rec in records(file):  # errors name the line as an editor does (or the row)
        i = len(out)
        q = _question(rec, question_key, file, line)
        a = _answer(rec, answer_key)
        if a is None:  # no gold: a training question may be labeled by the teacher (curate.label majority)
            spec.extra["unanswered"][first + i] = f"{file}, {line}, key {answer_key!r}"
        elif not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise FcotError(f"{file}, {line}, key {answer_key!r}: expected a string or number, "
                            f"got {type(a).__name__}")
        a = None if a is None else str(a).strip()
        choices = None
        if choices_key:
            choices = _choices(rec, choices_key, file, line)
            if a is not None and a in choices and a not in LETTERS[: len(choices)]:
                a = LETTERS[choices.index(a)]  # the text of a choice: its letter
            q = q.strip() + " " + verbalise(choices, LETTERS)
            choices = tuple(choices)
        a = _gold(a, answer_type, choices, file, line, answer_key)
        out.append(Sample(spec.name, first + i, q.strip(), a, choices))
    return out


def _split(spec: TaskSpec, path: Path, split_file: str | None, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """A user task's split: `split_file`'s train and test index lists, else a random split of the file's records
    seeded by `seed` (a `test_fraction` of them to test)."""
    if split_file:
        given = read_json(split_file)
        if not isinstance(given, dict) or not all(isinstance(given.get(k), list) for k in ("train", "test")):
            raise FcotError(f"{split_file}: expected an object with 'train' and 'test' index lists")
        return {"train": list(given["train"]), "test": list(given["test"])}
    order = list(range(len(spec.reader(spec, path, 0))))
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    return {"train": sorted(order[n_test:]), "test": sorted(order[:n_test])}


def jsonl_task(name: str, path: str | os.PathLike, *, question_key: str = "question", answer_key: str = "answer",
               answer_type: AnswerType = "text", choices_key: str | None = None, split_file: str | None = None,
               test_fraction: float = 0.3, seed: int = 0, register: bool = True, check: bool = True) -> TaskSpec:
    """Make a task from a JSONL file, or a CSV, TSV, Parquet, JSON or Arrow file or a `save_to_disk` folder (read
    with `datasets`; errors name its row). Keys may be dotted (`question.stem`).

    `choices_key` names a list of choice texts: they are verbalised like the paper's multiple choice
    tasks and the answer must be a letter (or the text of one choice, turned into its letter).
    The split comes from `split_file` ({"train": [...], "test": [...]}) or a seeded random split.
    `check` reads the whole file now (a bad record raises FcotError naming file, line and key).
    """
    _check_options(name, answer_type, choices_key)
    path = Path(path).expanduser().resolve()
    reader = functools.partial(_read_user_task, question_key=question_key, answer_key=answer_key,
                               answer_type=answer_type, choices_key=choices_key)
    definition = {"name": name, "path": str(path), "question_key": question_key, "answer_key": answer_key,
                  "answer_type": answer_type, "choices_key": choices_key,
                  "split_file": str(Path(split_file).expanduser().resolve()) if split_file else None,
                  "test_fraction": test_fraction, "seed": seed}
    split = functools.cache(lambda: _split(spec, path, split_file, test_fraction, seed))
    spec = TaskSpec(name, answer_type, (SourceFile(str(path), "", None),), reader, letters=LETTERS,
                    float_compare=answer_type == "number", description=f"user task from {path}",
                    extra={"split": split, "definition": definition,
                           "unanswered": {}})  # index -> where its answer is missing (the reader fills it)
    if check:
        reader(spec, path, 0)
    return register_task(spec) if register else spec


def split_user_tasks(cls, data):
    """Model validator (mode="before") of configs with `tasks` and `user_tasks`: a definition in `tasks` moves
    to `user_tasks` (its name stays), a name registered in this process by `jsonl_task` gets its definition
    added, every definition is registered, and every name must be a known task."""
    if not isinstance(data, dict) or data.get("tasks") is None:
        return data
    data = dict(data)
    tasks = data["tasks"] if isinstance(data["tasks"], list) else [data["tasks"]]
    defs: dict[str, UserTask] = {}
    given = [("user_tasks", i, d) for i, d in enumerate(data.get("user_tasks") or [])]
    for field, i, d in given + [("tasks", i, d) for i, d in enumerate(tasks)]:
        if isinstance(d, str):
            continue
        try:
            d = d if isinstance(d, UserTask) else UserTask.model_validate(d)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise FcotError(f"key '{field}.{i}.{key}': {err['msg'].lower()}") from None
        defs[d.name] = d
    names = [t if isinstance(t, str) else t["name"] if isinstance(t, dict) else t.name for t in tasks]
    for name in names:
        if name in TASKS and name in defs:
            raise FcotError(f"key 'tasks': task name {name!r} is taken by a built-in task")
        if name not in TASKS and name not in defs and user_task_definition(name):
            defs[name] = UserTask.model_validate(user_task_definition(name))  # registered with jsonl_task here
    for d in defs.values():
        d.register()
    for name in names:
        try:
            get_task(name)
        except FcotError as e:
            raise FcotError(f"key 'tasks': {e}") from None
    data["tasks"] = names
    data["user_tasks"] = [defs[n] for n in dict.fromkeys(names) if n in defs]
    return data


def read_task_file(path: str | os.PathLike) -> list[str]:
    """Register the user tasks of a YAML file (a list of definitions, or a config with `tasks`); their names."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise FcotError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise FcotError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    entries = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise FcotError(f"{path}: expected a list of task definitions (or a mapping with 'tasks')")
    try:
        return split_user_tasks(None, {"tasks": entries})["tasks"]
    except FcotError as e:
        raise FcotError(f"{path}, {e}") from None
