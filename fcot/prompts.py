"""Prompt formats of the paper, for teachers and students, decoders and encoder-decoders.

Teacher (zero-shot-CoT, two steps):
    step 1  `Q: {question}\nA: Let's think step by step.`            -> rationale
    step 2  `{step 1 prompt}{rationale}\nTherefore, the answer is`    -> answer text
Student (Fine-tune-CoT): `{question} ###` -> ` {rationale} --> {answer} END` (T5: bare question ->
`{rationale} --> {answer}`); vanilla fine-tuning: `{question} ###` -> ` {answer}`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from fcot.errors import FcotError

COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"
FEW_SHOT_ANSWER_PREFIX = "The answer is"


def zero_shot_cot_step1(question: str) -> str:
    return f"Q: {question.strip()}\nA: {COT_TRIGGER}"


def zero_shot_cot_step2(step1_prompt: str, rationale: str) -> str:
    return f"{step1_prompt}{rationale}\n{ANSWER_TRIGGER}"


def zero_shot_cot_step2_messages(messages: tuple, rationale: str) -> tuple:
    """Step 2 of a chat prompt: the assistant's turn continued with the rationale and the answer trigger (or,
    when step 1 was all in the user turn, the rationale as the answer and the trigger as the next user turn)."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1] + ({"role": "assistant", "content": zero_shot_cot_step2(messages[-1]["content"],
                                                                                    rationale)},)
    return messages + ({"role": "assistant", "content": rationale}, {"role": "user", "content": ANSWER_TRIGGER})


@functools.lru_cache(maxsize=1)
def _few_shot_table() -> dict:
    text = resources.files("fcot.data").joinpath("few_shot_cot.json").read_text(encoding="utf-8")
    return {task: group for group in json.loads(text).values() if isinstance(group, dict) for task in group["tasks"]}


def few_shot_exemplars(task: str) -> list[tuple[str, str, str]]:
    """(question, rationale, answer) exemplars of the task's few-shot-CoT prompt."""
    group = _few_shot_table().get(task)
    if group is None:
        raise FcotError(f"no few-shot-CoT exemplars for task {task!r}; pass your own with `exemplars=`")
    return [tuple(e) for e in group["exemplars"]]


def few_shot_excluded_indices(task: str) -> list[int]:
    """Train indices the exemplars were taken from (the paper keeps them out of evaluation)."""
    group = _few_shot_table().get(task)
    return list(group["exclude"]) if group else []


def few_shot_cot(task: str, question: str, exemplars: list[tuple[str, str, str]] | None = None) -> str:
    """Few-shot-CoT prompt (Wei et al. 2022): the answer follows `The answer is` in the completion."""
    shots = exemplars if exemplars is not None else few_shot_exemplars(task)
    demo = "\n".join(f"Q: {q}\nA: {r} {FEW_SHOT_ANSWER_PREFIX} {a}." for q, r, a in shots)
    return f"{demo}\nQ: {question.strip()}\nA:"


@dataclass(frozen=True)
class Format:
    """How a sample becomes (prompt, target) for a student, and where the answer is in a completion."""

    name: str
    prompt: str  # decoder prompt template
    target: str | None  # decoder target template (None: inference only)
    encoder_prompt: str
    encoder_target: str | None
    prefix: str | None  # the answer is the first candidate after this (None: first candidate)
    stop: str | None = None  # text that ends a completion

    def render_prompt(self, question: str, encoder_decoder: bool = False) -> str:
        template = self.encoder_prompt if encoder_decoder else self.prompt
        return template.format(question=question.strip())

    def render_target(self, answer: str, rationale: str = "", encoder_decoder: bool = False) -> str:
        template = self.encoder_target if encoder_decoder else self.target
        if template is None:
            raise FcotError(f"format {self.name!r} has no training target")
        if "{rationale}" in template and not rationale.strip():
            raise FcotError(f"format {self.name!r} needs a rationale")
        return template.format(rationale=rationale.strip(), answer=str(answer).strip())


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("fine_tune_cot", "{question} ###", " {rationale} --> {answer} END",
           "{question}", "{rationale} --> {answer}", prefix="-->", stop="END"),
    Format("vanilla", "{question} ###", " {answer}", "{question}", "{answer}", prefix=None),
    Format("zero_shot", "Q: {question}\n\nA:", None, "question: {question}", None, prefix=None),
    Format("natural", "Q: {question}\n\nA:", " {answer}", "Q: {question}", "{answer}", prefix=None),
    Format("fine_tune_cot_natural", "Q: {question}\n\nA: " + COT_TRIGGER + "\n\n",
           " {rationale}\n\n" + ANSWER_TRIGGER + " {answer}", "Q: {question}",
           "{rationale}\n\n" + ANSWER_TRIGGER + " {answer}", prefix=ANSWER_TRIGGER),
]}

# Where the answer starts in a completion, by method (what `fcot score --prefix` takes).
PREDICTION_PREFIX: dict[str, str | None] = {
    **{name: f.prefix for name, f in FORMATS.items()},
    "zero_shot_cot": None,  # scored on the step-2 completion, which follows the answer trigger
    "few_shot_cot": FEW_SHOT_ANSWER_PREFIX,
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise FcotError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


@functools.lru_cache(maxsize=1)
def templates_sha256() -> str:
    """A hash of every template here (teacher steps, student formats, few-shot exemplars): a stage marker made
    with other templates is stale (fcot.run.config_hash)."""
    step2 = zero_shot_cot_step2(zero_shot_cot_step1("{question}"), "{rationale}")
    blob = json.dumps([step2, FEW_SHOT_ANSWER_PREFIX, repr(FORMATS), PREDICTION_PREFIX, _few_shot_table()],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
