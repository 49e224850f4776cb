"""Student methods, one object each: what curation keeps, the training tasks each curated record becomes, the
question the student is asked at test time and where its answer is, and how reports name it.

Rule: a method is defined here and nowhere else; run, curate, train, evaluate and report read its definition, so
adding a method is one entry in METHODS. A method's `tasks` are prompt formats (fcot.prompts.Format, decoder and
encoder-decoder templates): each curated record gives one (prompt, completion) pair per task, and a task's tokens
carry the loss weight named by `weights` (a TrainConfig field, e.g. `rationale_weight`; None: 1). `asks` is the
format of the test-time question (prompt, stop text, and the prefix the answer follows), the first task's unless
said. Baselines of the untrained student (zero_shot, zero_shot_cot, few_shot_cot) are evaluation methods only,
in fcot.evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcot.errors import FcotError
from fcot.prompts import FORMATS, Format


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how reports name it
    uses_rationales: bool  # curation keeps the teacher's correct rationales (else the gold answers of the questions)
    tasks: tuple[Format, ...]
    weights: tuple[str | None, ...] = ()  # per task: the TrainConfig field holding its loss weight (None: 1)
    asks: Format | None = None  # the test-time format (default: the first task's)

    @property
    def ask(self) -> Format:
        return self.asks or self.tasks[0]

    def weight_keys(self) -> tuple[str | None, ...]:
        return self.weights or (None,) * len(self.tasks)


STEP_BY_STEP_LABEL = Format("step_by_step_label", "[label] {question} ###", " {answer}", "[label] {question}",
                            "{answer}", prefix=None)
STEP_BY_STEP_RATIONALE = Format("step_by_step_rationale", "[rationale] {question} ###", " {rationale}",
                                "[rationale] {question}", "{rationale}", prefix=None)

METHODS: dict[str, Method] = {m.name: m for m in [
    # Ho et al. 2023: the rationale, then the answer, in one completion.
    Method("fine_tune_cot", "Fine-tune-CoT", True, (FORMATS["fine_tune_cot"],)),
    # The baseline: the gold answer of the same questions, no rationale.
    Method("vanilla", "vanilla fine-tuning", False, (FORMATS["vanilla"],)),
    # Hsieh et al. 2023 (Distilling step-by-step): label and rationale as two tasks of one model, loss = label loss
    # + rationale_weight x rationale loss; at test time the label task only (a short generation).
    Method("step_by_step", "Distilling step-by-step", True, (STEP_BY_STEP_LABEL, STEP_BY_STEP_RATIONALE),
           weights=(None, "rationale_weight")),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FcotError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def asked(name: str) -> Format:
    """The test-time format of a method, or a prompt format by name (fcot.prompts.FORMATS)."""
    if name in METHODS:
        return METHODS[name].ask
    if name in FORMATS:
        return FORMATS[name]
    raise FcotError(f"unknown method or format {name!r}; known: {', '.join([*METHODS, *FORMATS])}")


def method_names(value: list[str]) -> list[str]:
    """Config validator of a list of student methods."""
    for name in value:
        get_method(name)
    return value
