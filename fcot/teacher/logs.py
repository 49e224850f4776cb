"""Read the Zero-shot-CoT authors' logs of a 175B teacher (text-davinci-002, greedy).

A log is a header (`Namespace(...)` with the run's arguments) and one block per question between lines
of asterisks:

    Q: {question}
    A: Let's think step by step.{rationale} {answer trigger}{step-2 completion}
    pred_before : {step-2 completion}
    pred_after : {the answer the authors extracted}
    pred_list / pred_mode / GT : {gold}

The answer trigger is task-specific there (`\nTherefore, the answer (arabic numerals) is`); the
Fine-tune-CoT paper uses `\nTherefore, the answer is` for every task. Blocks follow the authors'
shuffled data-loader order, not file order: match them to records by question text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from fcot.errors import FcotError
from fcot.prompts import COT_TRIGGER

# The Zero-shot-CoT repository's dataset names -> fcot task names.
KOJIMA_DATASETS = {
    "singleeq": "single_eq", "addsub": "addsub", "multiarith": "multiarith", "gsm8k": "gsm8k", "aqua": "aqua",
    "svamp": "svamp", "bigbench_date": "date_understanding", "object_tracking": "tracking_shuffled_objects",
    "last_letters": "last_letter_concatenation", "coin_flip": "coin_flip", "commonsensqa": "commonsense_qa",
    "strategyqa": "strategy_qa",
}

_RECORD_SEPARATOR = re.compile(r"^\*{20,}$", re.M)


@dataclass(frozen=True)
class LogRecord:
    task: str
    position: int  # order in the log
    question: str  # as the authors formatted it (`Answer Choices: (A) x (B) y` style)
    rationale: str  # the step-1 completion, as generated (leading space kept)
    trigger: str  # the step-2 answer trigger used in this log
    step2: str  # the step-2 completion, as generated
    pred_before: str  # the text the authors extracted the answer from (step2, sometimes cleaned)
    pred_after: str  # the answer the authors extracted ('' when none)
    gold: str  # the authors' gold answer (GT)


def _namespace_value(header: str, key: str, path: Path) -> str:
    m = re.search(rf"\b{key}=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", header)
    if not m:
        raise FcotError(f"{path}: header has no {key!r}; is this a Zero-shot-CoT log?")
    return ast.literal_eval(m.group(1))


def parse_zero_shot_cot_log(path: str | Path) -> list[LogRecord]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FcotError(f"{path}: cannot read ({e})") from None
    header = text[: text.find("\n", text.find("Namespace("))]
    dataset = _namespace_value(header, "dataset", path)
    if dataset not in KOJIMA_DATASETS:
        raise FcotError(f"{path}: unknown dataset {dataset!r} in the header")
    trigger = _namespace_value(header, "direct_answer_trigger", path)
    if _namespace_value(header, "method", path) != "zero_shot_cot":
        raise FcotError(f"{path}: not a zero_shot_cot log")
    task = KOJIMA_DATASETS[dataset]
    opening = f"\nA: {COT_TRIGGER}"

    records = []
    for block in _RECORD_SEPARATOR.split(text):
        if "\npred_before : " not in block:
            continue
        n = len(records)
        lines = block.split("\n")
        try:
            q = next(i for i, line in enumerate(lines) if line.startswith("Q: "))
            before = next(i for i, line in enumerate(lines) if line.startswith("pred_before : "))
            after = next(i for i, line in enumerate(lines) if line.startswith("pred_after : "))
            gt = next(i for i, line in enumerate(lines) if line.startswith("GT : "))
        except StopIteration:
            raise FcotError(f"{path}, record {n}: missing one of the lines Q:, pred_before, pred_after, GT") from None
        pred_before = "\n".join([lines[before][len("pred_before : "):]] + lines[before + 1: after])
        body = "\n".join(lines[q:before])
        # The step-2 completion follows the last trigger. Take it from the body: some logs print
        # `pred_before` stripped or with colons removed.
        cuts = [m.end() for m in re.finditer(re.escape(trigger), body)]
        if not cuts or opening not in body:
            raise FcotError(f"{path}, record {n}: expected 'Q: …\\nA: {COT_TRIGGER}…' then {trigger!r} and pred_before")
        step2 = body[cuts[-1]:]
        head = body[: cuts[-1] - len(trigger)]
        head = head[:-1] if head.endswith(" ") else head  # the authors joined rationale and trigger with a space
        cut = head.index(opening)
        records.append(LogRecord(
            task=task, position=n, question=head[3:cut], rationale=head[cut + len(opening):], trigger=trigger,
            step2=step2, pred_before=pred_before, pred_after=lines[after][len("pred_after : "):],
            gold=lines[gt][len("GT : "):].strip(),
        ))
    if not records:
        raise FcotError(f"{path}: no records found")
    return records
