"""Import teacher outputs written elsewhere, so real large-teacher rationales feed the later stages.

Formats:
- `zero_shot_cot_log`: the Zero-shot-CoT authors' logs (`../shared/data/teacher_logs`). Blocks are matched
  to task records by question text (the logs follow a shuffled order); for multiple choice tasks the
  logged answer letter is mapped through its choice text to fcot's letter (fcot orders date choices
  differently). The rationale is kept as written.
- `openai_batch`: OpenAI Batch API output JSONL whose `custom_id` is `fcot/{task}/{index}/{sample}/step1`
  or `.../step2` (`write_batch_requests` writes the matching input files).
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

from fcot.contracts.records import RecordStore, record
from fcot.contracts.teacher import TeachConfig, sample_key, sample_seed, sampling_params, teacher_id, teacher_identity
from fcot.errors import FcotError
from fcot.io import atomic_write_jsonl, iter_jsonl
from fcot.prompts import ANSWER_TRIGGER, zero_shot_cot_step1, zero_shot_cot_step2
from fcot.scoring import format_prediction, predict, score
from fcot.tasks import get_task
from fcot.teacher.logs import parse_zero_shot_cot_log
from fcot.teacher.plan import plan


def _stem(question: str) -> str:
    question = re.split(r" Answer [Cc]hoices:|\nWhich choice is true\?", question)[0]
    return re.sub(r"\s+", " ", question).strip()


def _record(cfg, sample, sample_index, prompt, rationale, answer_text, prediction, correct, finish_reason,
            model, temperature=0.0, tokens=(0, 0, 0, 0)) -> dict:
    # Repeated questions (MultiArith has some) are distinct records: the seed tells them apart, as in generation.
    seed = sample_seed(cfg.sampling.seed, sample.task, sample.index, sample_index)
    return record(
        task=sample.task, index=sample.index, sample_index=sample_index,
        key=sample_key(teacher_id(cfg), prompt, sample_index, seed), teacher_id=teacher_id(cfg),
        teacher=json.dumps(teacher_identity(cfg), sort_keys=True), question=sample.question, gold=sample.answer,
        prompt=prompt, rationale=rationale, answer_text=answer_text, prediction=prediction, correct=correct,
        finish_reason=finish_reason, prompt_tokens=tokens[0], completion_tokens=tokens[1],
        answer_prompt_tokens=tokens[2], answer_completion_tokens=tokens[3], engine="recorded", model=model,
        prompt_style="completion", temperature=temperature, top_p=1.0, max_new_tokens=cfg.sampling.max_new_tokens,
        seed=seed, created_at=time.time())


def from_zero_shot_cot_log(cfg: TeachConfig, path: Path, wanted: list) -> list[dict]:
    logged = parse_zero_shot_cot_log(path)
    task = logged[0].task
    spec = get_task(task)
    by_stem: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    # The log's own task, or else any of the config's tasks: a user task may hold the same questions (matched by
    # their text) under its own name, and several tasks the same ones (each gets the logged record).
    for s in [s for s in wanted if s.task == task] or wanted:
        by_stem[_stem(s.question)][s.task].append(s)
    out = []
    for r in logged:
        # Repeated questions (MultiArith has some) take records in order, in each task that holds them.
        out += [_logged_record(cfg, spec, c.pop(0), r) for c in by_stem.get(_stem(r.question), {}).values() if c]
    if not out:
        raise FcotError(f"{path}: a {task} log, and no question of it is among the config's tasks "
                        f"({', '.join(cfg.tasks)}, {cfg.split} split)")
    return out


def _logged_record(cfg: TeachConfig, spec, sample, r) -> dict:
    """The record of logged answer `r` for `sample` (a question of the config), scored by the paper's rules."""
    prediction, _ = predict(spec, r.step2, None)
    if spec.answer_type == "letter" and prediction is not None:
        # Their letter -> their choice text -> fcot's letter for the same choice.
        m = re.search(rf"\({prediction}\) (.*?)(?= \([A-F]\) |$)", r.question)
        text = m.group(1).strip().rstrip(".") if m else None
        ours = [c.rstrip(".") for c in sample.choices]
        prediction = spec.letters[ours.index(text)] if text in ours else None
    correct = None if sample.answer is None else (  # None: no gold to compare with
        prediction is not None and score(get_task(sample.task), str(prediction), sample.answer).correct)
    return _record(cfg, sample, 0, zero_shot_cot_step1(r.question), r.rationale, r.step2,
                   format_prediction(prediction), correct, "unknown", cfg.engine.model)


def _custom_id(task: str, index: int, sample_index: int, step: int) -> str:
    return f"fcot/{task}/{index}/{sample_index}/step{step}"


def from_openai_batch(cfg: TeachConfig, path: Path, wanted: list) -> list[dict]:
    by_key = {(s.task, s.index): s for s in wanted}
    steps: dict[tuple, dict] = defaultdict(dict)
    for lineno, rec in iter_jsonl(path):
        cid = rec.get("custom_id")
        m = re.fullmatch(r"fcot/([^/]+)/(\d+)/(\d+)/step([12])", cid or "")
        if not m:
            raise FcotError(f"{path}, line {lineno}, key 'custom_id': expected fcot/TASK/INDEX/SAMPLE/step1|2, "
                            f"got {cid!r}")
        response = rec.get("response") or {}
        if rec.get("error") or response.get("status_code") != 200:
            why = rec.get("error") or response.get("status_code")
            raise FcotError(f"{path}, line {lineno}: request {cid} failed ({why})")
        body = response.get("body") or {}
        try:
            choice = body["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise FcotError(f"{path}, line {lineno}, key 'response.body.choices': missing") from None
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        if not isinstance(text, str):
            raise FcotError(f"{path}, line {lineno}: choice has no text or message content")
        usage = body.get("usage") or {}
        steps[(m.group(1), int(m.group(2)), int(m.group(3)))][int(m.group(4))] = (
            text, choice.get("finish_reason"), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
            body.get("model", cfg.engine.model))
    out = []
    for (task, index, k), got in sorted(steps.items()):
        sample = by_key.get((task, index))
        if sample is None or 1 not in got:
            continue
        spec = get_task(task)
        rationale, finish, p1, c1, model = got[1]
        if 2 in got:
            answer_text, _, p2, c2, _ = got[2]
            result = score(spec, answer_text, sample.answer, prefix=None)
        else:  # no step 2: the paper's rule on the rationale with the answer trigger as prefix
            answer_text, p2, c2 = "", 0, 0
            result = score(spec, rationale, sample.answer, prefix=ANSWER_TRIGGER)
        out.append(_record(cfg, sample, k, zero_shot_cot_step1(sample.question), rationale, answer_text,
                           format_prediction(result.prediction),
                           result.correct, "stop" if finish == "stop" else "length", model, tokens=(p1, c1, p2, c2)))
    return out


def write_batch_requests(cfg: TeachConfig, path: str | Path, step1_output: str | Path | None = None,
                         chat: bool = False) -> Path:
    """Write an OpenAI Batch API input file: step 1 for the config's questions, or step 2 from step 1's output."""
    params = sampling_params(cfg)
    # Requests for a service whose output is not written yet: their items need no teacher id.
    items = {(it["task"], it["index"], it["sample_index"]): it for it in plan(cfg, tid="batch-requests")}
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    rows = []
    if step1_output is None:
        for (task, index, k), it in items.items():
            body = {"model": cfg.engine.model, "max_tokens": cfg.sampling.max_new_tokens,
                    "temperature": params["temperature"], "top_p": params["top_p"], "seed": int(it["seed"])}
            prompt = zero_shot_cot_step1(it["question"])
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            rows.append({"custom_id": _custom_id(task, index, k, 1), "method": "POST", "url": endpoint, "body": body})
    else:
        for lineno, rec in iter_jsonl(step1_output):
            m = re.fullmatch(r"fcot/([^/]+)/(\d+)/(\d+)/step1", rec.get("custom_id", ""))
            if not m or (m.group(1), int(m.group(2)), int(m.group(3))) not in items:
                continue
            choice = rec["response"]["body"]["choices"][0]
            rationale = choice.get("text") if "text" in choice else choice["message"]["content"]
            it = items[(m.group(1), int(m.group(2)), int(m.group(3)))]
            prompt = zero_shot_cot_step2(zero_shot_cot_step1(it["question"]), rationale)
            body = {"model": cfg.engine.model, "max_tokens": cfg.sampling.answer_max_new_tokens, "temperature": 0.0}
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            rows.append({"custom_id": _custom_id(m.group(1), int(m.group(2)), int(m.group(3)), 2), "method": "POST",
                         "url": endpoint, "body": body})
    return atomic_write_jsonl(path, rows)


def import_recorded(cfg: TeachConfig, store: RecordStore, wanted: list) -> list[dict]:
    """Import the records of the `wanted` questions into the store (skipping keys already there); returns them."""
    path = Path(cfg.engine.path)
    if not path.exists():
        raise FcotError(f"{path}: file not found (engine.path)")
    if cfg.engine.format == "zero_shot_cot_log":
        records = from_zero_shot_cot_log(cfg, path, wanted)
    else:
        records = from_openai_batch(cfg, path, wanted)
    if not records:
        raise FcotError(f"{path}: no record matches the selected questions ({', '.join(cfg.tasks)}, {cfg.split} split)")
    done = store.keys(teacher_id(cfg))
    new = [r for r in records if r["key"] not in done]
    for start in range(0, len(new), 1000):
        store.write(new[start:start + 1000])
    return records
