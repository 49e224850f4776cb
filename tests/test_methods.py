"""Student methods as one object each (fcot.methods): Distilling step-by-step as the method added by one entry, its
two tasks per curated record with their loss weights, exact under padding and packing, the one length rule, and a
run of three methods whose report compares the primary with the reference method and every pair, in which only
evaluation reads the test split."""

import json

import pytest
import yaml

from fcot.config import load_config
from fcot.curate import CurateConfig, curate
from fcot.errors import FcotError
from fcot.methods import METHODS, asked
from fcot.run import RunConfig
from tests.conftest import run_fcot
from tests.test_curate_eval import _rows


def test_step_by_step_is_one_entry_with_two_weighted_tasks_asked_the_label():
    m = METHODS["step_by_step"]
    assert m.uses_rationales and [t.name for t in m.tasks] == ["step_by_step_label", "step_by_step_rationale"]
    assert m.weight_keys() == (None, "rationale_weight") and asked("step_by_step").name == "step_by_step_label"
    assert asked("fine_tune_cot").prefix == "-->" and asked("vanilla").prefix is None
    with pytest.raises(FcotError, match="unknown method or format 'nope'"):
        asked("nope")


def test_step_by_step_curation_gives_both_tasks_of_each_kept_record(tmp_path, recorded_teacher, tiny_llama,
                                                                     ray_local):
    base = {"tasks": "multiarith", "teacher": recorded_teacher, "student": str(tiny_llama), "dev_fraction": 0.1,
            "max_length": 512}
    sbs = curate(load_config(CurateConfig, base={**base, "method": "step_by_step", "output_dir": str(tmp_path / "s")}))
    ft = curate(load_config(CurateConfig, base={**base, "output_dir": str(tmp_path / "f")}))
    st, ft_st = sbs["tasks"]["multiarith"], ft["tasks"]["multiarith"]
    assert st["kept"] == sbs["kept"] > 250 and sbs["pairs"] == 2 * sbs["kept"]
    assert st["samples"] == ft_st["samples"] and st["dropped_incorrect"] == ft_st["dropped_incorrect"]
    rows = _rows(tmp_path / "s" / "train")
    by_record = {}
    for r in rows:
        by_record.setdefault((r["index"], r["sample_index"]), {})[r["part"]] = r
    label, rationale = next(iter(by_record.values()))[0], next(iter(by_record.values()))[1]
    assert all(set(parts) == {0, 1} for parts in by_record.values())
    assert label["prompt"].startswith("[label] ") and label["weight_key"] == ""
    assert rationale["prompt"].startswith("[rationale] ") and rationale["weight_key"] == "rationale_weight"
    assert "-->" not in rationale["completion"] and len(label["completion"]) < 12
    # the test-time question is the label task: its generation length comes from the label completions
    assert sbs["completion_length_max"] == max(r["completion_length"] for r in rows if r["part"] == 0)
    assert sbs["max_length"] == 512


def test_task_weights_weigh_each_examples_tokens_exactly_padded_and_packed(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.train import attention
    from fcot.train.data import Collator
    from fcot.train.objectives import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts, completions = ["[label] 2 + 3 ###", "[rationale] 2 + 3 ###"], [" 5", " add them: 5"]
    for packing in (False, True):
        model.set_attn_implementation(attention.NAME if packing else "sdpa")
        c = Collator(AutoTokenizer.from_pretrained(tiny_llama), 64, encoder_decoder=False, packing=packing)
        both = c.encode(prompts, completions)
        with torch.no_grad():
            first = loss_sum(model, c.collate(both[:1]), False)[0]
            second = loss_sum(model, c.collate(both[1:]), False)[0]
            assert "weights" not in c.collate(both, [1.0, 1.0])  # all ones: the plain sum
            for w in (0.0, 0.5, 2.0):
                weighted = loss_sum(model, c.collate(both, [1.0, w]), False)[0]
                assert torch.allclose(weighted, first + w * second, rtol=1e-5), (packing, w)


def test_train_max_length_follows_curation_and_a_mismatch_names_both_keys(tmp_path):
    base = {"tasks": ["coin_flip"], "output_dir": str(tmp_path / "r"), "teacher": {"engine": {"kind": "recorded",
            "log": "coin_flip"}}, "curate": {"max_length": 384}}
    assert load_config(RunConfig, base=base).train.max_length == 384
    with pytest.raises(FcotError, match=r"'train.max_length' \(256\) differs from 'curate.max_length' \(384\)"):
        load_config(RunConfig, base={**base, "train": {"max_length": 256}})
    with pytest.raises(FcotError, match="unknown method 'distill'"):
        load_config(RunConfig, base={**base, "methods": ["fine_tune_cot", "distill"]})
    cfg = load_config(RunConfig, base={**base, "methods": ["step_by_step", "fine_tune_cot", "vanilla"]})
    assert (cfg.primary_method, cfg.reference_method) == ("step_by_step", "vanilla")


@pytest.mark.slow
def test_a_run_of_three_methods_compares_them_with_intervals_and_reads_the_test_split_only_to_evaluate(
        tmp_path, tiny_llama, shared_data, ray_local, monkeypatch):
    """Three methods and a baseline in one run (`fcot.run.run`, in this process so that it can be watched): the
    report compares the primary with the reference method and every pair; and model selection never sees the test
    split: every stage before evaluation (teacher, curation with its dev split, training with its per-epoch dev
    evaluation and selection) loads training questions only."""
    import dataclasses
    import sys

    from fcot import run as run_module
    from fcot.tasks import loading

    calls, current = [], {"stage": None}
    real, real_stages = loading.load_split, run_module.stages

    def spy(name, split="train", *args, **kwargs):
        calls.append((current["stage"], split))
        return real(name, split, *args, **kwargs)

    def watched(s):
        def fn():
            current["stage"] = s.name
            try:
                return s.fn()
            finally:
                current["stage"] = None
        return dataclasses.replace(s, fn=fn)

    for module in [m for n, m in list(sys.modules.items()) if n.startswith("fcot") and hasattr(m, "load_split")]:
        monkeypatch.setattr(module, "load_split", spy)
    monkeypatch.setattr(run_module, "stages", lambda cfg, log=print: [watched(s) for s in real_stages(cfg, log)])
    cfg = load_config(RunConfig, base={
        "name": "three", "output_dir": str(tmp_path / "run"), "tasks": ["coin_flip"], "wandb_mode": "disabled",
        "methods": ["fine_tune_cot", "step_by_step", "vanilla"], "baselines": ["zero_shot"],
        "teacher": {"subset": 40, "engine": {"kind": "recorded", "log": "coin_flip"}},
        "curate": {"max_length": 384},
        "train": {"model": str(tiny_llama), "epochs": 1, "batch_size": 4, "num_workers": 1, "max_steps": 3,
                  "rationale_weight": 0.5, "lora": {"r": 4}},  # LoRA students (tiny-llama)
        "eval": {"subset": 12}})
    run_module.run(cfg, log=lambda line: None)
    run = tmp_path / "run"
    # (Outside any stage, the run's checks read every split's records first: a bad record stops it before any work.)
    test_reads = {stage for stage, split in calls if split == "test" and stage is not None}
    assert test_reads == {f"eval-{m}" for m in ("fine_tune_cot", "step_by_step", "vanilla", "zero_shot")}, calls
    assert {stage for stage, split in calls if split == "train"} >= {"teacher", "curate-fine_tune_cot"}
    dev = [json.loads(line)["index"] for line in (run / "curated" / "vanilla" / "dev.jsonl").open()]
    assert dev and not set(dev) & {s.index for s in real("coin_flip", "test")}
    selected = json.loads((run / "students" / "vanilla" / "model" / "fcot_selection.json").read_text())
    assert selected["selection"] == "best_dev"

    report = (run / "report.md").read_text()
    assert report.splitlines()[2].startswith("**coin_flip: ") and "Fine-tune-CoT" in report.splitlines()[2]
    assert "vanilla fine-tuning" in report.splitlines()[2]
    for pair in ("Fine-tune-CoT − Distilling step-by-step", "Fine-tune-CoT − vanilla fine-tuning",
                 "Distilling step-by-step − vanilla fine-tuning"):
        assert f"| coin_flip | {pair} | " in report, pair
    predictions = (run / "eval" / "step_by_step" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and all("[rationale]" not in json.loads(p)["completion"] for p in predictions)
    metrics = json.loads((run / "eval" / "step_by_step" / "metrics.json").read_text())
    stats = json.loads((run / "curated" / "step_by_step" / "stats.json").read_text())
    assert metrics["max_new_tokens"] == stats["completion_length_max"] + 8  # the label task only: short
    train = json.loads((run / "stages" / "train-step_by_step.json").read_text())["result"]
    assert train["steps"] == 3 and train["dev"] and train["trainable_parameters"] < train["parameters"] / 5
    assert (run / "students" / "step_by_step" / "model" / "adapter_config.json").exists()


def test_chat_template_students_are_asked_in_their_template(smollm2, tiny_llama):
    from transformers import AutoTokenizer

    from fcot.methods import chat_completion, chat_prompt, uses_chat

    chat, plain = AutoTokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(tiny_llama)
    plain.chat_template = None  # a base model's tokenizer
    assert uses_chat("auto", chat) and not uses_chat("auto", plain) and not uses_chat(False, chat)
    with pytest.raises(FcotError, match="train.chat_template: true, but the student .* has no chat template"):
        uses_chat(True, plain)
    prompt, completion = "2 + 3 ###", " add them --> 5 END"
    head, tail = chat_prompt(chat, prompt), chat_completion(chat, prompt, completion)
    assert head.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n2 + 3 ###<|im_end|>" in head
    assert tail == "add them --> 5 END"  # the trainer appends the EOS, <|im_end|>: the end of the turn
    full = chat.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": tail}],
                                    tokenize=False)
    assert full.rstrip("\n") == head + tail + chat.eos_token


@pytest.mark.slow
def test_fcot_run_with_a_chat_template_lora_student(tmp_path, smollm2, ray_local):
    config = {
        "name": "chat", "output_dir": "run", "tasks": ["coin_flip"], "wandb_mode": "disabled",
        "methods": ["fine_tune_cot"], "baselines": [],
        "teacher": {"subset": 16, "engine": {"kind": "recorded", "log": "coin_flip"}},
        "curate": {"max_length": 256, "dev_fraction": 0},
        "train": {"model": smollm2, "chat_template": True, "epochs": 1, "batch_size": 2, "num_workers": 1,
                  "max_steps": 2, "lr": 1e-4, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                  "gradient_checkpointing": True},
        "eval": {"subset": 3, "engine": {"cpus_per_replica": 2}},
    }
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(config))
    run_fcot("run", "chat.yaml", cwd=tmp_path, check=True, cluster=ray_local)
    rows = _rows(tmp_path / "run" / "curated" / "fine_tune_cot" / "train")
    assert rows and all(r["prompt"].startswith("<|im_start|>system") for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["completion"].endswith(" END") for r in rows)
    predictions = (tmp_path / "run" / "eval" / "fine_tune_cot" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3
    train = json.loads((tmp_path / "run" / "stages" / "train-fine_tune_cot.json").read_text())["result"]
    assert train["steps"] == 2 and train["trainable_parameters"] < train["parameters"] / 100


def test_qlora_needs_cuda_and_says_so_naming_the_key():
    from fcot.train.config import TrainConfig

    with pytest.raises(Exception, match="lora.quantize: 4-bit QLoRA needs CUDA GPUs"):
        TrainConfig(data="x", lora={"quantize": "4bit"})
    assert TrainConfig(data="x", lora={"quantize": "4bit"}, use_gpu=True).lora.quantize == "4bit"
