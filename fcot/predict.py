"""Asking a model its questions and scoring its answers: one rule for evaluation (engine replicas) and for the
trainer's dev selection (the model in memory).

Rule: a question is asked in its method's test-time format (fcot.methods; a student with a chat template through
it), or as a baseline (zero-shot: the bare format; zero-shot-CoT in two steps; few-shot-CoT with the paper's
exemplars); sample j of a question has seed sample_seed(seed, task, index, 0) + j; each completion is scored once,
by fcot.scoring with its finish reason, and k > 1 completions vote.
"""

from __future__ import annotations

from collections import Counter

from fcot.contracts.teacher import sample_seed
from fcot.engines import Completion, HFEngine, Request
from fcot.methods import METHODS, asked
from fcot.prompts import FORMATS, PREDICTION_PREFIX, few_shot_cot, zero_shot_cot_step1, zero_shot_cot_step2
from fcot.scoring import Score, format_prediction, score, summarize
from fcot.tasks import Sample, get_task

AUTO_MARGIN = 8  # "auto" generation length: the longest curated completion plus this many tokens


def prediction_prefix(method: str) -> str | None:
    """Where the answer starts in a completion of `method` (a student method, a baseline or a prompt format)."""
    return asked(method).prefix if method in METHODS or method in FORMATS else PREDICTION_PREFIX[method]


def make_requests(method: str, samples: list[dict], max_new_tokens: int, k: int, temperature: float, seed: int,
                  encoder_decoder: bool, chat: bool = False) -> list[Request]:
    """The engine requests of `samples`: k per question, asked in `method`'s test-time format or as a baseline
    (module doc), sample j of a question seeded sample_seed(seed, task, index, 0) + j."""
    reqs = []
    for s in samples:
        messages = None
        if method in METHODS or method in FORMATS:  # a student's test-time question, or a prompt format
            fmt = asked(method)
            prompt = fmt.render_prompt(s["question"], encoder_decoder)
            stop = (fmt.stop,) if fmt.stop and not encoder_decoder else ()
            if chat and method in METHODS:  # the question as the user turn of the student's chat template
                prompt, messages = None, ({"role": "user", "content": prompt},)
        elif method == "zero_shot_cot":
            prompt, stop = zero_shot_cot_step1(s["question"]), ()
        else:
            prompt, stop = few_shot_cot(s["task"], s["question"]), ("\nQ:",)
        first = sample_seed(seed, s["task"], int(s["index"]), 0)
        for j in range(k):  # consecutive from the question's own: a question's k samples never share a seed
            reqs.append(Request(prompt=prompt, messages=messages, max_new_tokens=max_new_tokens,
                                temperature=temperature if k > 1 else 0.0, seed=(first + j) & 0x7FFFFFFF, stop=stop))
    return reqs


def predict_samples(engine, samples: list[dict], method: str, max_new_tokens: int = 256, k: int = 1,
                    temperature: float = 0.7, seed: int = 0, chat: bool = False) -> list[dict]:
    """Generate and score; one row per question: its answer is the majority vote over its k completions when
    k > 1 (ties: the first seen), and `sample_*` keep every completion's answer, correctness and length, for
    pass@1 and pass@k (`sample_completions` when k > 1: at k = 1 it is `completion`). `chat`: a student method's
    question goes through the model's chat template (fcot.methods.uses_chat)."""
    encoder_decoder = bool(getattr(engine, "encoder_decoder", False))
    reqs = make_requests(method, samples, max_new_tokens, k, temperature, seed, encoder_decoder, chat)
    outs = engine.generate(reqs)
    if method == "zero_shot_cot":  # step 2: greedy answer extraction after the trigger
        outs2 = engine.generate([Request(prompt=zero_shot_cot_step2(r.prompt, o.text), max_new_tokens=32)
                                 for r, o in zip(reqs, outs)])
    prefix = prediction_prefix(method)
    rows = []
    for i, s in enumerate(samples):
        spec = get_task(s["task"])
        scored: list[tuple] = []
        for j in range(k):
            o: Completion = outs[i * k + j]
            text = outs2[i * k + j].text if method == "zero_shot_cot" else o.text
            scored.append((score(spec, text, s["answer"], prefix=prefix, finish_reason=o.finish_reason), o))
        votes = Counter(r.prediction for r, _ in scored if r.prediction is not None)
        winner = votes.most_common(1)[0][0] if votes else None
        result, out = next(((r, o) for r, o in scored if r.prediction == winner), scored[0])
        rows.append({"task": s["task"], "index": int(s["index"]), "answer": s["answer"], "completion": out.text,
                     **result.to_dict(), "prediction": format_prediction(result.prediction), "k": k,
                     "votes": votes[winner] if winner is not None else 0, "completion_tokens": out.completion_tokens,
                     "sample_predictions": [format_prediction(r.prediction) for r, _ in scored],
                     "sample_correct": [bool(r.correct) for r, _ in scored],
                     "sample_completion_tokens": [int(o.completion_tokens) for _, o in scored],
                     "sample_completions": [o.text for _, o in scored] if k > 1 else []})
    return rows


def dev_scores(model, tokenizer, samples: list[Sample], format_name: str = "fine_tune_cot", max_new_tokens: int = 256,
               batch_size: int = 32, chat: bool = False, synced_gpus: bool = False) -> list:
    """Greedy scores of an in-memory model on `samples` (the trainer's dev evaluation between epochs); with
    `synced_gpus` every rank of a ZeRO-3 group must call it with as many samples."""
    engine = HFEngine.from_model(model, tokenizer, batch_size=batch_size, synced_gpus=synced_gpus)
    was_training = model.training
    rows = predict_samples(engine, [s.to_dict() for s in samples], format_name, max_new_tokens, chat=chat)
    model.train(was_training)
    # predict_samples scored each row once (with its finish reason): its scores, not a second scoring of the text
    return [Score(**{k: r[k] for k in ("prediction", "correct", "contains_answer", "correct_format", "complete")})
            for r in rows]


def dev_summary(samples: list[Sample], scores: list) -> dict:
    summary = summarize(",".join(sorted({s.task for s in samples})), scores)
    summary["outcomes"] = [int(s.correct) for s in scores]  # per question, in the samples' order (for intervals)
    return summary
