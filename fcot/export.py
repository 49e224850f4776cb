"""`fcot export RUN_DIR --to DIR`: a run's curated sets and its teachers' records as a Hugging Face dataset folder.

The folder is what `Dataset.save_to_disk` writes (`datasets.load_from_disk(DIR)` reads it back, row for row), with
a dataset card (README.md): the teachers, the curation filter, the counts, and where it came from. Splits: one per
curated method (its training pairs: task, index, sample_index, prompt, completion) and `teacher_records` (every
teacher's records: question, rationale, answer, prediction, correct, and how each was generated). It is written
beside DIR and renamed into place: a DIR that exists is never overwritten. `--push-to-hub REPO` uploads it too.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fcot.errors import FcotError
from fcot.io import read_json
from fcot.layout import RunLayout

RECORDS_SPLIT = "teacher_records"


def _no_half(t: pa.DataType) -> pa.DataType:
    """`t` with float16 (a teacher's top-k logprobs) as float32: datasets has no float16."""
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_list(t):
        return pa.list_(_no_half(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _no_half(f.type)) for f in t])
    return t


def _records(records_dir: Path) -> pa.Table:
    files = sorted(records_dir.glob("*.parquet"))
    if not files:
        raise FcotError(f"{records_dir}: no teacher records (did the run's teacher stage finish?)")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.cast(pa.schema([pa.field(f.name, _no_half(f.type)) for f in table.schema]))
    return table.sort_by([("teacher_id", "ascending"), ("task", "ascending"), ("index", "ascending"),
                          ("sample_index", "ascending")])


def _count(value) -> str:
    """A curation count or fraction as written in a config: 160.0 -> 160, 0.5 -> 0.5, None -> all."""
    return "all" if value is None else f"{value:g}"


def _card(run: Path, config: dict, splits: dict[str, int], curated: dict[str, dict], teachers: list[dict]) -> str:
    lines = ["---", "tags:", "- fine-tune-cot", "- chain-of-thought", "- distillation", "---", "",
             f"# {config.get('name', run.name)}: Fine-tune-CoT data exported by fcot", "",
             "Rationales a teacher wrote for reasoning questions, the ones fcot kept for fine-tuning a student "
             "(Ho, Schmid, Yun, *Large Language Models Are Reasoning Teachers*, ACL 2023), and every record the "
             "teachers wrote. Read it with `datasets.load_from_disk(FOLDER)`.", "", "## Splits", "",
             "| split | rows |", "| --- | --- |", *[f"| {name} | {n} |" for name, n in splits.items()], "",
             "## Teachers", ""]
    for t in teachers:
        desc = t.get("teacher", {})
        sampling = desc.get("sampling", {})
        lines.append(f"- `{t.get('teacher_id')}`: {desc.get('model')} ({desc.get('engine')} engine), prompt "
                     f"{desc.get('prompt')}, temperature {sampling.get('temperature')}, "
                     f"max {sampling.get('max_new_tokens')} new tokens, {desc.get('split')} split")
    lines += ["", "## Curation (what was kept)", ""]
    cfg = config.get("curate", {})
    lines.append(f"Filter: {cfg.get('filter', 'correct')} (a rationale is kept when its answer equals the "
                 f"{cfg.get('label', 'gold')} label); samples per question: {_count(cfg.get('num_samples'))}; "
                 f"training questions: {_count(cfg.get('train_questions'))}; at most {cfg.get('max_length')} tokens "
                 f"for prompt and completion (student {cfg.get('student')}).")
    lines += ["", "| method | teacher | task | questions | kept | dropped (incorrect) | dev questions (not here) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, stats in curated.items():
        for task, st in stats.get("tasks", {}).items():
            lines.append(f"| {method} | {stats.get('teacher_id') or '—'} | {task} | {st.get('questions')} | "
                         f"{st.get('kept')} | {st.get('dropped_incorrect', '—')} | {st.get('dev_questions')} |")
    lines += ["", "## Provenance", "",
              f"Exported from the fcot run `{run}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
              f"UTC; its tasks: {', '.join(config.get('tasks', []))}. The run's config (secrets redacted) is "
              "`fcot_run_config.json` beside this card.", ""]
    return "\n".join(lines)


def export(run_dir: str | os.PathLike, to: str | os.PathLike, push_to_hub: str | None = None, log=print) -> Path:
    """Write the run's curated sets and teacher records to the dataset folder `to`; returns it."""
    import datasets  # heavy: only here

    datasets.disable_progress_bars()
    run, dest = Path(run_dir).resolve(), Path(to).resolve()
    layout = RunLayout(run)
    if not layout.config.exists():
        raise FcotError(f"{run}: not an fcot run directory (no config.json)")
    if dest.exists():
        raise FcotError(f"{dest} exists: export writes a new folder (nothing is overwritten)")
    config = read_json(layout.config)
    curated = {p.name: read_json(p / "stats.json") for p in sorted((run / "curated").glob("*"))
               if (p / "stats.json").exists() and (p / "train").exists()}
    if not curated:
        raise FcotError(f"{run}: no curated set (did the run's curation stages finish?)")
    splits = {m: datasets.Dataset(pq.read_table(run / "curated" / m / "train")) for m in curated}
    splits[RECORDS_SPLIT] = datasets.Dataset(_records(layout.teacher / "records"))
    teachers = [read_json(p) for p in sorted((layout.teacher / "teachers").glob("*.json"))]
    dd = datasets.DatasetDict(splits)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        dd.save_to_disk(str(work))
        (work / "README.md").write_text(_card(run, config, {k: len(v) for k, v in splits.items()}, curated,
                                              teachers), encoding="utf-8")
        (work / "fcot_run_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        os.replace(work, dest)  # atomic: a half-written folder never looks exported
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"exported {', '.join(f'{k} ({len(v)} rows)' for k, v in splits.items())} to {dest}")
    if push_to_hub:
        try:
            dd.push_to_hub(push_to_hub)
            from huggingface_hub import HfApi  # only when pushing

            HfApi().upload_file(path_or_fileobj=str(dest / "README.md"), path_in_repo="README.md",
                                repo_id=push_to_hub, repo_type="dataset")
        except Exception as e:  # no network, no token, no such repo: one line, the folder stays
            raise FcotError(f"push to the hub as {push_to_hub} failed ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); the folder {dest} is "
                            f"written") from None
        log(f"pushed to https://huggingface.co/datasets/{push_to_hub}")
    return dest
