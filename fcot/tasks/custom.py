"""A user task from any JSONL file: a field mapping and an answer type."""

from __future__ import annotations

import os
import random
from pathlib import Path

from fcot.errors import FcotError
from fcot.io import iter_jsonl, read_json
from fcot.tasks.loading import register_task
from fcot.tasks.registry import AnswerType, Sample, SourceFile, TaskSpec, _number_string, _verbalise

LETTERS = "ABCDEFGHIJ"
ANSWER_TYPES = ("number", "letter", "yes_no", "text")


def _get(obj: dict, dotted: str, path: Path, record: int):
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise FcotError(f"{path}, record {record}, key {dotted!r}: missing")
        value = value[part]
    return value


def jsonl_task(name: str, path: str | os.PathLike, *, question_key: str = "question", answer_key: str = "answer",
               answer_type: AnswerType = "text", choices_key: str | None = None, split_file: str | None = None,
               test_fraction: float = 0.3, seed: int = 0, register: bool = True) -> TaskSpec:
    """Make a task from a JSONL file. Keys may be dotted (`question.stem`).

    `choices_key` names a list of choice texts: they are verbalised like the paper's multiple choice
    tasks and the answer must be a letter (or the text of one choice, turned into its letter).
    The split comes from `split_file` ({"train": [...], "test": [...]}) or a seeded random split.
    """
    if answer_type not in ANSWER_TYPES:
        raise FcotError(f"task {name}, key 'answer_type': expected one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
    path = Path(path).expanduser().resolve()
    if choices_key and answer_type != "letter":
        raise FcotError(f"task {name}: 'choices_key' needs answer_type 'letter', got {answer_type!r}")

    def reader(spec: TaskSpec, file: Path, first: int) -> list[Sample]:
        out = []
        for _lineno, rec in iter_jsonl(file):
            i = len(out)
            q = _get(rec, question_key, file, i)
            if not isinstance(q, str):
                raise FcotError(f"{file}, record {i}, key {question_key!r}: expected str, got {type(q).__name__}")
            if not q.strip():
                raise FcotError(f"{file}, record {i}, key {question_key!r}: empty")
            a = _get(rec, answer_key, file, i)
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                raise FcotError(f"{file}, record {i}, key {answer_key!r}: expected a string or number, got {type(a).__name__}")
            a = str(a).strip()
            choices = None
            if choices_key:
                choices = _get(rec, choices_key, file, i)
                if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or not 2 <= len(choices) <= len(LETTERS):
                    raise FcotError(f"{file}, record {i}, key {choices_key!r}: expected a list of 2–{len(LETTERS)} strings")
                if a in choices and a not in LETTERS[: len(choices)]:
                    a = LETTERS[choices.index(a)]
                q = q.strip() + " " + _verbalise(choices, LETTERS)
                choices = tuple(choices)
            if answer_type == "number":
                a = _number_string(a, path=file, record=i, key=answer_key)
            elif answer_type == "yes_no":
                a = a.lower().rstrip(".")
                if a not in ("yes", "no"):
                    raise FcotError(f"{file}, record {i}, key {answer_key!r}: expected yes or no, got {a!r}")
            elif answer_type == "letter" and a not in (LETTERS[: len(choices)] if choices else LETTERS):
                raise FcotError(f"{file}, record {i}, key {answer_key!r}: expected a choice letter, got {a!r}")
            if not a:
                raise FcotError(f"{file}, record {i}, key {answer_key!r}: empty")
            out.append(Sample(name, first + i, q.strip(), a, choices))
        return out

    spec = TaskSpec(name, answer_type, (SourceFile(str(path), "", None),), reader,
                    letters=LETTERS, float_compare=answer_type == "number", description=f"user task from {path}")
    n = len(reader(spec, path, 0))
    if split_file:
        split = read_json(split_file)
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "test")):
            raise FcotError(f"{split_file}: expected an object with 'train' and 'test' index lists")
    else:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_test = round(n * test_fraction)
        split = {"train": sorted(order[n_test:]), "test": sorted(order[:n_test])}
    spec.extra["split"] = {"train": list(split["train"]), "test": list(split["test"])}
    return register_task(spec) if register else spec
