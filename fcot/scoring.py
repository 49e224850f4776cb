"""Answer extraction and scoring, exactly as the Fine-tune-CoT paper's evaluator does it.

Candidates are extracted per task (numbers with commas removed; letters A–E, A–F for dates, A–C for
shuffled objects; yes/no tokens; the whole cleaned string for last letters). With a prefix (`-->` for
Fine-tune-CoT students, the answer trigger for teachers), the first candidate after the prefix is the
prediction, or the *last* candidate of the whole text when the prefix is missing; with no prefix, the
first candidate. Floats are compared with tolerance 1e-6 on addsub, svamp and single_eq, strings exactly
elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from fcot.errors import FcotError
from fcot.io import atomic_write_jsonl, iter_jsonl, require
from fcot.tasks import TaskSpec, get_task, load_records

Prediction = Union[str, float, None]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_YES_NO_SEPARATORS = re.compile(r"\"|'|\n|\.|\s|:|,")
_LAST_LETTER_STRIP = re.compile(r"\"|'|\n|\.|\s")


def candidates(spec: TaskSpec, text: str) -> list:
    """Every substring of `text` that has the task's answer format, in order."""
    if spec.answer_type == "letter":
        return re.findall(f"[{spec.letters}]", text)
    if spec.answer_type == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        return [float(s) for s in found] if spec.float_compare else found
    if spec.answer_type == "yes_no":
        return [w for w in _YES_NO_SEPARATORS.sub(" ", text.lower()).split(" ") if w in ("yes", "no")]
    if spec.answer_type == "text":
        return [_LAST_LETTER_STRIP.sub("", text)]
    raise ValueError(f"unknown answer type {spec.answer_type!r}")


def clean_answer(spec: TaskSpec, answer: str):
    """The gold answer in the form predictions are compared with."""
    answer = str(answer).strip()
    if spec.answer_type == "number":
        answer = answer.replace(",", "")
        return float(answer) if spec.float_compare else answer
    if spec.answer_type == "yes_no":
        return answer.lower()
    return answer


def predict(spec: TaskSpec, completion: str, prefix: str | None = None) -> tuple[Prediction, list]:
    """(prediction, all candidates considered) following the paper's prefix rule."""
    if prefix is None:
        found, first = candidates(spec, completion), True
    else:
        at = completion.find(prefix)
        if at == -1:
            found, first = candidates(spec, completion), False
        else:
            found, first = candidates(spec, completion[at + len(prefix):]), True
    if not found:
        return None, found
    return (found[0] if first else found[-1]), found


def format_prediction(prediction: Prediction) -> str | None:
    """A prediction as records and reports store it: floats without a trailing `.0`, None kept."""
    if prediction is None:
        return None
    if isinstance(prediction, float):
        return str(int(prediction)) if prediction.is_integer() else repr(prediction)
    return str(prediction)


def is_correct(spec: TaskSpec, prediction: Prediction, answer) -> bool:
    if prediction is None:
        return False
    if spec.float_compare:
        return abs(prediction - answer) <= 1e-6
    return prediction == answer


@dataclass
class Score:
    prediction: Prediction
    correct: bool | None  # None (and contains_answer None) for a question without gold
    contains_answer: bool | None
    correct_format: bool
    complete: bool | None  # None when the finish reason is unknown

    def to_dict(self) -> dict:
        return {"prediction": self.prediction, "correct": self.correct, "contains_answer": self.contains_answer,
                "correct_format": self.correct_format, "complete": self.complete}


def score(task: str | TaskSpec, completion: str, answer: str | None, prefix: str | None = None,
          finish_reason: str | None = None) -> Score:
    """Score one completion against the gold answer with the paper's rules (without gold: the prediction only)."""
    spec = get_task(task) if isinstance(task, str) else task
    gold = None if answer is None else clean_answer(spec, answer)
    prediction, found = predict(spec, completion, prefix)
    return Score(
        prediction=prediction,
        correct=None if answer is None else is_correct(spec, prediction, gold),
        contains_answer=None if answer is None else any(is_correct(spec, c, gold) for c in found),
        correct_format=prefix is None or prefix in completion,
        complete=None if finish_reason is None else finish_reason == "stop",
    )


def summarize(task: str, scores: list[Score]) -> dict:
    """Accuracy and the paper's other rates over a list of scores."""
    n = len(scores)
    known = [s.complete for s in scores if s.complete is not None]

    def rate(values):
        return sum(values) / len(values) if values else None

    return {
        "task": task, "n": n,
        "accuracy": rate([s.correct for s in scores]),
        "correct_format": rate([s.correct_format for s in scores]),
        "contains_answer": rate([s.contains_answer for s in scores]),
        "complete": rate(known),
    }


def score_jsonl(task: str, input_path, prefix: str | None = None, output_path=None, root=None) -> dict:
    """Score a JSONL of completions: each line `{"index", "completion"[, "answer"][, "finish_reason"]}`.

    `index` points into the task's records (file order, `Sample.index`); `answer` overrides the gold.
    Writes one result per line to `output_path` (default: `<input>.scored.jsonl`) and returns the summary.
    """
    spec = get_task(task)
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else input_path.with_name(input_path.stem + ".scored.jsonl")
    gold = {s.index: s.answer for s in load_records(task, root)}
    rows, scores = [], []
    for lineno, rec in iter_jsonl(input_path):
        where = dict(path=f"{input_path}, line {lineno}")
        index = require(rec, "index", int, **where)
        completion = require(rec, "completion", str, **where)
        if "answer" in rec:
            answer = str(require(rec, "answer", (str, int, float), **where))
        elif gold.get(index) is not None:
            answer = gold[index]
        elif index in gold:
            raise FcotError(f"{input_path}, line {lineno}, key 'index': question {index} of task {task} has no gold "
                            f"answer; give it as 'answer'")
        else:
            raise FcotError(f"{input_path}, line {lineno}, key 'index': {index} is not a record of task {task} "
                            f"(indices {min(gold)}–{max(gold)})")
        if spec.answer_type == "number" and not _NUMBER.fullmatch(answer.strip().replace(",", "")):
            raise FcotError(f"{input_path}, line {lineno}, key 'answer': {answer!r} is not a number")
        finish_reason = require(rec, "finish_reason", str, **where) if rec.get("finish_reason") is not None else None
        s = score(spec, completion, answer, prefix=prefix, finish_reason=finish_reason)
        scores.append(s)
        rows.append({"index": index, "answer": answer, **s.to_dict()})
    if not rows:
        raise FcotError(f"{input_path}: no completions to score")
    atomic_write_jsonl(output_path, rows)
    return summarize(task, scores)
