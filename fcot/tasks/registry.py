"""The paper's 12 tasks: where their raw files live, how to read them, how their answers look.

Each reader turns one source's raw records, in file order, into `Sample`s with the paper's
preprocessing (Kojima et al.'s data reader as adapted by the Fine-tune-CoT authors):
multiple choice verbalised as `… Answer choices: (A) x, (B) y.`, BIG-bench inputs followed by
`Which choice is true?`, date choices shuffled deterministically (the source always lists the
correct one first), numeric answers as strings without a trailing `.0`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from fcot.errors import FcotError, where
from fcot.io import iter_jsonl, read_json, require

AnswerType = Literal["number", "letter", "yes_no", "text"]


@dataclass(frozen=True)
class Sample:
    task: str
    index: int  # position in the task's records, file order (files concatenated, train file first)
    question: str
    answer: str | None  # the gold answer; None: a user task's question without one (fcot.tasks.custom)
    choices: tuple[str, ...] | None = None  # choice texts for (A), (B), ... where the task has them

    def to_dict(self) -> dict:
        return {"task": self.task, "index": self.index, "question": self.question,
                "answer": self.answer, "choices": list(self.choices) if self.choices else None}


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the data dir, under datasets/
    url: str
    sha256: str | None  # None: not pinned here (recorded on first download)
    records: int | None = None  # expected count, checked when read


@dataclass(frozen=True)
class TaskSpec:
    name: str
    answer_type: AnswerType
    files: tuple[SourceFile, ...]  # concatenated in this order to form the index space
    reader: Callable[["TaskSpec", Path, int], list[Sample]]  # (spec, file, first_index) -> samples
    letters: str = ""  # candidate letters for multiple choice tasks
    float_compare: bool = False  # the paper compares floats with tolerance 1e-6 on these tasks
    optional_files: tuple[str, ...] = ()  # files whose absence only removes the train split
    split_kinds: tuple[str, ...] = ("default",)
    description: str = ""
    extra: dict = field(default_factory=dict)


KOJIMA = "https://raw.githubusercontent.com/kojima-takeshi188/zero_shot_cot/main/dataset"
KOJIMA_LOGS = "https://raw.githubusercontent.com/kojima-takeshi188/zero_shot_cot/main/log"
# The Zero-shot-CoT authors' logs of a 175B teacher (text-davinci-002, greedy), by task: teacher_logs/{name}
TEACHER_LOGS = {
    "single_eq": "singleeq", "addsub": "addsub", "multiarith": "multiarith", "gsm8k": "gsm8k", "aqua": "aqua",
    "svamp": "svamp", "date_understanding": "date_understanding", "tracking_shuffled_objects": "shuffled_objects",
    "last_letter_concatenation": "last_letters", "coin_flip": "coin_flip", "commonsense_qa": "commonsensqa",
    "strategy_qa": "strategyqa"}
TEACHER_LOG_SHA256 = {  # the six in ../shared/data; the others are recorded on first download
    "coin_flip": "6c5cd500498686106fad37b8ce85bed2bd26a790b6b1aaa8bec382a0d1103048",
    "commonsensqa": "f8027dc6f4c85045ad7567dc71a9b5a4d69fb75af7cdf08ef809fcea617a2757",
    "date_understanding": "14090fec37b29d4b7053f6ccc8d3865b8ffd949d9d2f21ae71c55f145cb087c8",
    "last_letters": "31e13b33aed4f1c8a920b10914fb31bc0965089afc714d0e72cf78a2f17387b5",
    "multiarith": "e2e3416d5f376b84513847b0ed2ac40fcfbe424b8279a18f0b6c980ff75fa351",
    "svamp": "37043ef358b75e108860746c533d0c9be0f307ec3373959524778f1b8af5a75a"}


def teacher_log(task: str) -> str:
    """The data dir's path of a task's recorded 175B teacher log."""
    return f"teacher_logs/{TEACHER_LOGS[task]}_zero_shot_cot.log"
SPLITS = "https://raw.githubusercontent.com/itsnamgyu/reasoning-teacher/main/data/split"


def number_string(value, *, path, record=None, key, line=None) -> str:
    text = str(value).strip().replace(",", "")
    if text.endswith(".0"):
        text = text[:-2]
    try:
        float(text)
    except ValueError:
        raise FcotError(f"{where(path, record, key, line)}: expected a number, got {value!r}") from None
    return text


def _nonempty(text: str, *, path, record=None, key, line=None) -> str:
    text = text.strip()
    if not text:
        raise FcotError(f"{where(path, record, key, line)}: empty")
    return text


def verbalise(choices: list[str], letters: str) -> str:
    return "Answer choices: " + ", ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices)) + "."


def _json_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise FcotError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _bigbench_examples(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise FcotError(f"{path}, key 'examples': expected a list of examples")
    return data["examples"]


def _record(obj, path, i=None, line=None) -> dict:
    if not isinstance(obj, dict):
        raise FcotError(f"{where(path, i, line=line)}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_solutions_json(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    """SingleEq, AddSub, MultiArith: `sQuestion`, `lSolutions[0]`."""
    out = []
    for i, rec in enumerate(_json_list(path)):
        rec = _record(rec, path, i)
        q = _nonempty(require(rec, "sQuestion", str, path=path, record=i), path=path, record=i, key="sQuestion")
        sols = require(rec, "lSolutions", list, path=path, record=i)
        if not sols:
            raise FcotError(f"{path}, record {i}, key 'lSolutions': empty list")
        a = number_string(sols[0], path=path, record=i, key="lSolutions")
        out.append(Sample(spec.name, first + i, q, a))
    return out


def read_svamp(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    out = []
    for i, rec in enumerate(_json_list(path)):
        rec = _record(rec, path, i)
        body = require(rec, "Body", str, path=path, record=i)
        question = require(rec, "Question", str, path=path, record=i)
        q = _nonempty(body.strip() + " " + question.strip(), path=path, record=i, key="Question")
        a = number_string(require(rec, "Answer", (int, float, str), path=path, record=i),
                           path=path, record=i, key="Answer")
        out.append(Sample(spec.name, first + i, q, a))
    return out


def read_gsm8k(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    out = []
    for lineno, rec in iter_jsonl(path):
        i = len(out)
        q = _nonempty(require(rec, "question", str, path=path, line=lineno), path=path, line=lineno, key="question")
        answer = require(rec, "answer", str, path=path, line=lineno)
        if "####" not in answer:
            raise FcotError(f"{path}, line {lineno}, key 'answer': no final answer after '####'")
        a = number_string(answer.split("####")[-1], path=path, line=lineno, key="answer")
        out.append(Sample(spec.name, first + i, q, a))
    return out


def read_aqua(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    out = []
    for lineno, rec in iter_jsonl(path):
        i = len(out)
        q = _nonempty(require(rec, "question", str, path=path, line=lineno), path=path, line=lineno, key="question")
        options = require(rec, "options", list, path=path, line=lineno)
        choices = []
        for k, opt in enumerate(options):
            if not isinstance(opt, str) or len(opt) < 2 or opt[1] != ")" or opt[0] != spec.letters[k]:
                raise FcotError(f"{path}, line {lineno}, key 'options': option {k} is not like 'A)…': {opt!r}")
            choices.append(opt[2:].strip())
        a = require(rec, "correct", str, path=path, line=lineno).strip()
        if a not in spec.letters[: len(choices)]:
            raise FcotError(f"{path}, line {lineno}, key 'correct': {a!r} is not one of the option letters")
        out.append(Sample(spec.name, first + i, q + " " + verbalise(choices, spec.letters), a, tuple(choices)))
    return out


def read_commonsense_qa(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    out = []
    for lineno, rec in iter_jsonl(path):
        i = len(out)
        question = require(rec, "question", dict, path=path, line=lineno)
        stem = require(question, "stem", str, path=path, line=lineno)
        q = _nonempty(stem, path=path, line=lineno, key="question.stem")
        raw = require(question, "choices", list, path=path, line=lineno)
        labels = [require(_record(c, path, line=lineno), "label", str, path=path, line=lineno) for c in raw]
        choices = [require(c, "text", str, path=path, line=lineno) for c in raw]
        if labels != list(spec.letters[: len(labels)]):
            raise FcotError(f"{path}, line {lineno}, key 'question.choices': labels {labels} are not A, B, …")
        a = require(rec, "answerKey", str, path=path, line=lineno)
        if a not in labels:
            raise FcotError(f"{path}, line {lineno}, key 'answerKey': {a!r} is not one of {labels}")
        out.append(Sample(spec.name, first + i, q + " " + verbalise(choices, spec.letters), a, tuple(choices)))
    return out


def read_bigbench_choice(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    """Date understanding and tracking shuffled objects: BIG-bench `input` + `target_scores`."""
    out = []
    for i, ex in enumerate(_bigbench_examples(path)):
        ex = _record(ex, path, i)
        text = require(ex, "input", str, path=path, record=i)
        _nonempty(text, path=path, record=i, key="input")
        scores = require(ex, "target_scores", dict, path=path, record=i)
        keys = list(scores)
        if spec.extra.get("shuffle_choices"):
            # The source lists the correct date first; shuffle with a seed taken from the text itself,
            # so the order is the same on every machine and does not depend on record order.
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            random.Random(seed).shuffle(keys)
        if not 2 <= len(keys) <= len(spec.letters):
            raise FcotError(f"{path}, record {i}, key 'target_scores': {len(keys)} choices, "
                            f"expected 2–{len(spec.letters)}")
        correct = [k for k in keys if scores[k] == 1]
        if len(correct) != 1:
            raise FcotError(f"{path}, record {i}, key 'target_scores': expected exactly one choice scored 1")
        choices = [k.strip().rstrip(".") for k in keys]
        q = text + "\nWhich choice is true? " + verbalise(choices, spec.letters)
        out.append(Sample(spec.name, first + i, q.strip(), spec.letters[keys.index(correct[0])], tuple(choices)))
    return out


def read_strategy_qa(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    out = []
    for i, ex in enumerate(_bigbench_examples(path)):
        ex = _record(ex, path, i)
        q = _nonempty(require(ex, "input", str, path=path, record=i), path=path, record=i, key="input")
        scores = require(ex, "target_scores", dict, path=path, record=i)
        if scores.get("Yes") not in (0, 1):
            raise FcotError(f"{path}, record {i}, key 'target_scores': expected a 'Yes' score of 0 or 1")
        out.append(Sample(spec.name, first + i, q, "yes" if scores["Yes"] == 1 else "no"))
    return out


def read_question_answer_examples(spec: TaskSpec, path: Path, first: int) -> list[Sample]:
    """Coin flip and last letter concatenation: `examples[].question`, `examples[].answer`."""
    out = []
    for i, ex in enumerate(_bigbench_examples(path)):
        ex = _record(ex, path, i)
        q = _nonempty(require(ex, "question", str, path=path, record=i), path=path, record=i, key="question")
        a = _nonempty(require(ex, "answer", str, path=path, record=i), path=path, record=i, key="answer")
        if spec.answer_type == "yes_no":
            a = a.lower()
            if a not in ("yes", "no"):
                raise FcotError(f"{path}, record {i}, key 'answer': expected 'yes' or 'no', got {a!r}")
        out.append(Sample(spec.name, first + i, q, a))
    return out


def _src(path, records=None, url=None):
    return SourceFile(path, url or f"{KOJIMA}/{path}", FILE_SHA256[path], records)


# sha256 of each source file (None: not pinned, recorded on first download)
FILE_SHA256 = {
    "SingleEq/questions.json": "051507bd2b489c257057b485774a83d2710c23a4bc0f4a58e1822ae2773ef05e",
    "AddSub/AddSub.json": "21930fa90385c72b5a15f4b9a4dda27276b889ae9ff44285505cdd9fa0a20df8",
    "MultiArith/MultiArith.json": "dc9db1b6cc68b1ecc2dec830d15aaf8c9a0932aa31d5ffce88ef3628179d36f4",
    "grade-school-math/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "grade-school-math/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "AQuA/test.json": "de41581881ef95c5588c44ddc701c77fd480839241dd422a0d181262af24520c",
    "SVAMP/SVAMP.json": "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e",
    "Bigbench_Date/task.json": "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f",
    "Bigbench_object_tracking/task.json": "74b74d3c8827c0387a3f24ee9efa7edd90b2d53af3daacb9961341af66f750a0",
    "last_letters/last_letters.json": "60e8d092d0a6423d3256e87e0c249b69aefea4cd27985082095fa4e93931fb02",
    "coin_flip/coin_flip.json": "68cf201737a1463ef6bed5419622805a8934d92bff6a28a9dfbf83be3135ba5a",
    "CommonsenseQA/train_rand_split.jsonl": "58ffa3c8472410e24b8c43f423d89c8a003d8284698a6ed7874355dedd09a2fb",
    "CommonsenseQA/dev_rand_split.jsonl": "3210497fdaae614ac085d9eb873dd7f4d49b6f965a93adadc803e1229fd8a02a",
    "StrategyQA/task.json": "60af9081fed20102fd8bb1e02dc7d9f12238efcba33e4c1a56b4d61cb6409803",
    "AQuA/train.json": None,
}


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("single_eq", "number", (_src("SingleEq/questions.json", 508),),
             read_solutions_json, float_compare=True, description="SingleEq arithmetic word problems"),
    TaskSpec("addsub", "number", (_src("AddSub/AddSub.json", 395),),
             read_solutions_json, float_compare=True, description="AddSub addition/subtraction word problems"),
    TaskSpec("multiarith", "number", (_src("MultiArith/MultiArith.json", 600),),
             read_solutions_json, split_kinds=("default", "template"), description="MultiArith multi-step arithmetic"),
    TaskSpec("gsm8k", "number", (
        _src("grade-school-math/train.jsonl", 7473,
             url="https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl"),
        _src("grade-school-math/test.jsonl", 1319)),
             read_gsm8k, description="GSM8K grade-school math"),
    TaskSpec("aqua", "letter", (
        _src("AQuA/train.json", 97467, url="https://raw.githubusercontent.com/google-deepmind/AQuA/master/train.json"),
        _src("AQuA/test.json", 254)),
             read_aqua, letters="ABCDE", optional_files=("AQuA/train.json",),
             description="AQuA-RAT algebra, 5 choices"),
    TaskSpec("svamp", "number", (_src("SVAMP/SVAMP.json", 1000),),
             read_svamp, float_compare=True, description="SVAMP arithmetic with perturbations"),
    TaskSpec("date_understanding", "letter", (_src("Bigbench_Date/task.json", 369),),
             read_bigbench_choice, letters="ABCDEF", split_kinds=("default", "template"),
             description="BIG-bench date understanding, up to 6 choices", extra={"shuffle_choices": True}),
    TaskSpec("tracking_shuffled_objects", "letter", (_src("Bigbench_object_tracking/task.json", 750),),
             read_bigbench_choice, letters="ABC", description="BIG-bench tracking shuffled objects (3 objects)"),
    TaskSpec("last_letter_concatenation", "text", (_src("last_letters/last_letters.json", 500),),
             read_question_answer_examples, description="Concatenate the last letters of 4 names"),
    TaskSpec("coin_flip", "yes_no", (_src("coin_flip/coin_flip.json", 500),),
             read_question_answer_examples, description="Is the coin still heads up after 4 people flip or not"),
    TaskSpec("commonsense_qa", "letter", (
        _src("CommonsenseQA/train_rand_split.jsonl", 9741,
             url="https://s3.amazonaws.com/commensenseqa/train_rand_split.jsonl"),
        _src("CommonsenseQA/dev_rand_split.jsonl", 1221)),
             read_commonsense_qa, letters="ABCDE", description="CommonsenseQA, 5 choices"),
    TaskSpec("strategy_qa", "yes_no", (_src("StrategyQA/task.json", 2290),),
             read_strategy_qa, description="StrategyQA implicit multi-hop yes/no questions"),
]}

SPLIT_SHA256 = {
    "addsub__default": "1a6f70a39554084978a44439db0b661b039ce4dd2c09572d2ff9f44f5ef668d0",
    "aqua__default": "8f6a271a99d34bc1fdf062672088eb17f7f782d86c60d9a709f06b6b8144ff6d",
    "coin_flip__default": "a5f7ffe4a1a1e0181cbd9d00259d34f980c0073efe8a3ed25f69433cfb74a3a4",
    "commonsense_qa__default": "4cec2867bc6bc201eaa5fc96844870d85356f32b4fa652c75b8b5e42b9fedc76",
    "date_understanding__default": "5fbfdd1f0db941dce6accd7f43316eda2a2254f3a80f9a3a045f5a19bfb04578",
    "date_understanding__template": "9b4508734ffc2ae908615e3f9f6ca3c9e27f44e4b5e714d220bd7152ddd39d89",
    "gsm8k__default": "cf0f484fcaa270ff33f4ce00bff3f7e1f7f30b3e3bc76d0abcb74c22a6e9a6e0",
    "last_letter_concatenation__default": "a5f7ffe4a1a1e0181cbd9d00259d34f980c0073efe8a3ed25f69433cfb74a3a4",
    "multiarith__default": "f2f47aeb18026cb3d1909b38b8828693aeaf624af3282d8021dbee32008a1409",
    "multiarith__template": "188abcfb1358424791e2d9c8d622ad10356283405fab11e1a58fa374cd9a48f4",
    "single_eq__default": "d46feb082615045ea0909c5ed062ef85f29ba95223cbca39e0bfbb1ad1b5e1b7",
    "strategy_qa__default": "0857d069a693a83c20466971b7e522b3c90c3258146c9b9461df98e4d2468de1",
    "svamp__default": "fae6cc3a5c50952da78b66991182be507c8585e6a59954e03bd997488608ab1f",
    "tracking_shuffled_objects__default": "6f2a4637d6e0692297e5eaa66bf53518445e1fbae1d94f28daae0040b7a1156a",
}
