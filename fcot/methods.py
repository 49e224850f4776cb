"""Student methods, one object each: what curation keeps, the training tasks each curated record becomes, the
question the student is asked at test time and where its answer is, how reports name it, and which method it is
compared with.

Rule: a method is defined here and nowhere else; run, curate, train, evaluate and report read its definition, so
adding a method is one entry in METHODS. A method's `tasks` are prompt formats (fcot.prompts.Format, decoder and
encoder-decoder templates): each curated record gives one (prompt, completion) pair per task, and a task's tokens
carry the loss weight named by `weights` (a TrainConfig field, e.g. `rationale_weight`; None: 1). `asks` is the
format of the test-time question (prompt, stop text, and the prefix the answer follows), the first task's unless
said. `reference` is the method a method is compared with: a report (fcot.report) gives the verdict of every
method against its reference where both were trained, under the method's `label` (`short` in narrow columns). A
student with a chat template (`train.chat_template`) is prompted through it (`uses_chat`, `chat_prompt`,
`chat_completion`), in curation, training and evaluation alike. Baselines of the untrained student (zero_shot,
zero_shot_cot, few_shot_cot) are evaluation methods only, in fcot.evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    reference: str | None = None  # the method it is compared with (a METHODS name; None: none)
    short: str = ""  # how a narrow table column names it (default: label)
    # Learns in rounds from its own samples, each token graded by the teacher (fcot.rollout), starting from another
    # method's student (run.on_policy); curation gives it its questions and dev split only.
    on_policy: bool = False

    @property
    def ask(self) -> Format:
        return self.asks or self.tasks[0]

    @property
    def short_label(self) -> str:
        return self.short or self.label

    def weight_keys(self) -> tuple[str | None, ...]:
        return self.weights or (None,) * len(self.tasks)


STEP_BY_STEP_LABEL = Format("step_by_step_label", "[label] {question} ###", " {answer}", "[label] {question}",
                            "{answer}", prefix=None)
STEP_BY_STEP_RATIONALE = Format("step_by_step_rationale", "[rationale] {question} ###", " {rationale}",
                                "[rationale] {question}", "{rationale}", prefix=None)

METHODS: dict[str, Method] = {m.name: m for m in [
    # Ho et al. 2023: the rationale, then the answer, in one completion.
    Method("fine_tune_cot", "Fine-tune-CoT", True, (FORMATS["fine_tune_cot"],), reference="vanilla"),
    # The baseline: the gold answer of the same questions, no rationale.
    Method("vanilla", "vanilla fine-tuning", False, (FORMATS["vanilla"],), short="vanilla"),
    # Hsieh et al. 2023 (Distilling step-by-step): label and rationale as two tasks of one model, loss = label loss
    # + rationale_weight x rationale loss; at test time the label task only (a short generation).
    Method("step_by_step", "Distilling step-by-step", True, (STEP_BY_STEP_LABEL, STEP_BY_STEP_RATIONALE),
           weights=(None, "rationale_weight"), reference="vanilla", short="step-by-step"),
    # Agarwal et al. 2024 (GKD), Thinking Machines 2025: the Fine-tune-CoT student samples its own rationales, the
    # teacher grades every token, and the student learns the per-token reverse KL to the teacher on them, in rounds.
    Method("on_policy", "on-policy distillation", True, (FORMATS["fine_tune_cot"],), reference="fine_tune_cot",
           short="on-policy", on_policy=True),
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


ChatTemplate = Literal["auto", True, False]  # auto: when the student's tokenizer has a chat template


def uses_chat(setting: ChatTemplate, tokenizer, encoder_decoder: bool = False,
              key: str = "train.chat_template") -> bool:
    """Whether a student is prompted through its chat template (its question as the user turn, its completion as
    the assistant turn; the loss on the assistant's tokens only): `auto` when its tokenizer has one."""
    if tokenizer is None:  # a served model (openai engine): the server renders its own template
        return setting is True
    has = bool(getattr(tokenizer, "chat_template", None)) and not encoder_decoder
    if setting is True and not has:
        raise FcotError(f"{key}: true, but the student {getattr(tokenizer, 'name_or_path', '')} has no chat template")
    return has if setting == "auto" else bool(setting)


def chat_prompt(tokenizer, prompt: str) -> str:
    """A student's prompt in its chat template: the user turn and the opening of the assistant's."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_completion(tokenizer, prompt: str, completion: str) -> str:
    """The assistant turn that follows `chat_prompt`, as the template writes it, without its final end-of-turn
    when that is the EOS (the trainer appends the EOS, so the student learns to end its turn)."""
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]
    full, head = tokenizer.apply_chat_template(turns, tokenize=False), chat_prompt(tokenizer, prompt)
    if not full.startswith(head):
        raise FcotError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'the student')} does not continue "
                        "its generation prompt with the assistant turn: set train.chat_template: false")
    tail = full[len(head):].rstrip("\n")
    eos = tokenizer.eos_token
    return tail[: -len(eos)] if eos and tail.endswith(eos) else tail


def method_names(value: list[str]) -> list[str]:
    """Config validator of a list of student methods."""
    for name in value:
        get_method(name)
    return value
