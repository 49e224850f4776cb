"""Student training on Ray Train + DeepSpeed (CPU, tiny random models): ZeRO-2 and ZeRO-3 with 2 workers,
an encoder-decoder, a worker SIGKILLed mid-epoch, and the packing collate."""

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fcot.config import load_config
from fcot.errors import FcotError
from fcot.prompts import FORMATS
from fcot.train.config import TrainConfig
from fcot.train.data import IGNORE, Collator, pad_batch
from tests.conftest import ROOT, epoch_committed, run_fcot

FMT = FORMATS["fine_tune_cot"]


def curated(path: Path, samples, repeat: int, encoder_decoder: bool = False) -> Path:
    """Curated parquet (the curation stage's contract) with a templated rationale per question."""
    rows = []
    for k in range(repeat):
        for s in samples:
            rationale = f"We add the numbers in the question. So the answer is {s.answer}."
            rows.append({"task": s.task, "index": s.index, "sample_index": k,
                         "prompt": FMT.render_prompt(s.question, encoder_decoder),
                         "completion": FMT.render_target(s.answer, rationale, encoder_decoder)})
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "part-0.parquet")
    return path


@pytest.fixture(scope="module")
def samples(shared_data):
    from fcot.tasks import load_split

    return load_split("multiarith", "train")[:8]


def config(tmp_path, data, model, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [f"data={data}", f"model={model}", f"output_dir={tmp_path / 'out'}",
                                           "num_workers=2", "batch_size=8", "lr=3e-3", "wandb.mode=disabled",
                                           *overrides])


def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


# -- collate ------------------------------------------------------------------------------------------------

def test_packing_masks_loss_and_attention(tiny_llama, samples, tmp_path):
    """Labels are -100 exactly on prompt tokens and padding, positions restart per example, and a packed
    micro-batch gives the same loss and gradients as the padded one (no attention across examples), for
    Llama (rotary positions) and GPT-2 (learned positions)."""
    from transformers import AutoModelForCausalLM

    from fcot.bundled import make_tiny_model
    from fcot.train import attention
    from fcot.train.objectives import loss_sum

    tok = tokenizer(tiny_llama)
    batch = {"prompt": [FMT.render_prompt(s.question) for s in samples[:5]],
             "completion": [FMT.render_target(s.answer, "Add them up.") for s in samples[:5]]}
    collate = Collator(tok, max_length=160, encoder_decoder=False, packing=True)
    examples = collate.encode(batch["prompt"], batch["completion"])
    prompt_lens = [len(tok(p, add_special_tokens=False).input_ids) for p in batch["prompt"]]
    packed = collate(batch)
    padded = pad_batch(examples, tok.pad_token_id)
    total = sum(len(ids) for ids, _ in examples)
    assert packed["input_ids"].shape == (1, total)  # one row, no padding

    ids, labels, pos = (packed[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    bounds = packed["cu_seq_lens_q"].tolist()
    assert bounds[0] == 0 and bounds[-1] == total and packed["max_length_q"] == max(len(e) for e, _ in examples)
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        assert ids[a:b] == examples[j][0] and pos[a:b] == list(range(b - a))
        n = prompt_lens[j]
        assert labels[a:a + n] == [IGNORE] * n  # prompt: no loss
        assert labels[a + n:b] == ids[a + n:b] and ids[b - 1] == tok.eos_token_id  # completion + EOS: loss
    assert int(packed["label_tokens"]) == sum(len(ids) - n for (ids, _), n in zip(examples, prompt_lens))
    assert int(packed["tokens"]) == total
    # Padded batch: same rule, padding on the right.
    for row, ((ids, _), n) in enumerate(zip(examples, prompt_lens)):
        labels = padded["labels"][row].tolist()
        assert labels[:n] == [IGNORE] * n and labels[n:len(ids)] == ids[n:] and set(labels[len(ids):]) <= {IGNORE}

    gpt2 = make_tiny_model(tmp_path / "gpt2", "gpt2", vocab_texts=batch["prompt"] + batch["completion"])
    for path in (tiny_llama, gpt2):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        c = Collator(tokenizer(path), 160, encoder_decoder=False, packing=True)
        encoded = c.encode(batch["prompt"], batch["completion"])
        losses, grads = [], []
        for b, impl in ((pad_batch(encoded, c.pad_id), "sdpa"), (c.collate(encoded), attention.NAME)):
            model.set_attn_implementation(impl)
            model.zero_grad()
            loss = loss_sum(model, b, False)[0]
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.allclose(losses[0], losses[1], rtol=1e-5), (path, losses)
        assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6), path
        # loss_sum asks for the logits of target positions only: the same sum as every position's cross-entropy.
        b = pad_batch(encoded, c.pad_id)
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                     ignore_index=IGNORE, reduction="sum")
        assert torch.allclose(full, losses[0], rtol=1e-5), (path, full, losses[0])
        # The check can fail: the same row attended as one sequence (examples see each other) gives another loss.
        model.set_attn_implementation("sdpa")
        row = c.collate(encoded)
        one = {"input_ids": row["input_ids"], "labels": row["labels"], "position_ids": row["position_ids"],
               "attention_mask": torch.ones_like(row["input_ids"])}
        with torch.no_grad():
            assert not torch.allclose(loss_sum(model, one, False)[0], losses[1], rtol=1e-5)


def test_truncation_and_bad_config(tiny_llama, tmp_path):
    tok = tokenizer(tiny_llama)
    out = Collator(tok, max_length=8, encoder_decoder=False, packing=False)(
        {"prompt": ["a very long prompt that goes on and on ###"], "completion": [" short --> 1 END"]})
    assert out["input_ids"].shape == (1, 8) and set(out["labels"][0].tolist()) == {IGNORE}
    with pytest.raises(FcotError, match="divisible"):
        load_config(TrainConfig, None, ["data=x", "batch_size=6", "num_workers=4"])
    with pytest.raises(FcotError, match="missing column 'completion'"):
        bad = tmp_path / "bad"
        bad.mkdir()
        pq.write_table(pa.table({"task": ["t"], "index": [0], "sample_index": [0], "prompt": ["p"]}), bad / "x.parquet")
        from fcot.contracts.curated import check_curated
        check_curated(str(bad))
    plain = tmp_path / "plain"  # curated without the teacher's top-k: an SFT student's data, not a KD one's
    plain.mkdir()
    pq.write_table(pa.table({"task": ["t"], "index": [0], "sample_index": [0], "prompt": ["p"], "completion": ["c"]}),
                   plain / "x.parquet")
    assert check_curated(str(plain)) == 1
    with pytest.raises(FcotError, match=f"data {plain}: no column 'teacher_logprobs'.*curate.teacher_logprobs"):
        check_curated(str(plain), kd=True)


# -- Ray Train ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_zero2_two_workers_loss_decreases_and_model_loads(tmp_path, tiny_llama, samples, ray_local, monkeypatch):
    """... and the precision is the workers' own choice: the driver, told the opposite of what this CPU computes
    natively, does not decide it."""
    from transformers import AutoModelForCausalLM

    from fcot import hardware
    from fcot.train.trainer import train

    native = hardware.cpu_bf16()
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: not native)  # the driver's view only: workers see their CPU

    data = curated(tmp_path / "data", samples[:4], repeat=8)  # 32 rows: 4 steps per epoch
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples[:4]))
    cfg = config(tmp_path, data, tiny_llama, "epochs=3", "deepspeed.stage=2", "packing=true",
                 f"dev={{path: {dev}, max_new_tokens: 8}}")
    summary = train(cfg)
    assert summary["steps"] == summary["planned_steps"] == 12 and summary["epochs"] == 3
    curve = summary["loss_curve"]
    assert len(curve) == 12 and curve[-1] < curve[0] - 0.5, curve
    assert summary["tokens_per_s"] > 0 and summary["restarts"] == 0
    assert summary["precision"]["dtype"] == ("bfloat16" if native else "float32"), summary["precision"]
    assert [d["epoch"] for d in summary["dev"]] == [1, 2, 3]
    for d in summary["dev"]:  # each epoch's dev accuracy is its questions' outcomes, counted here
        assert d["n"] == len(d["outcomes"]) == 4 and d["accuracy"] == sum(d["outcomes"]) / 4
        assert d["complete"] is not None  # scored once, as evaluation scores: with each completion's finish reason
    assert summary["best_dev_accuracy"] == max(d["accuracy"] for d in summary["dev"])
    # The student is the best dev epoch (the earliest of equals), saved with a note of which it is.
    accuracies = [d["accuracy"] for d in summary["dev"]]
    assert summary["selected_epoch"] == summary["best_epoch"] == 1 + accuracies.index(max(accuracies))
    selection = json.loads((Path(summary["model_dir"]) / "fcot_selection.json").read_text())
    assert selection["epoch"] == summary["best_epoch"]
    assert not (Path(summary["output_dir"]) / "candidates").exists()
    assert json.loads((Path(summary["output_dir"]) / "summary.json").read_text())["steps"] == 12

    tok = tokenizer(summary["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    ids = tok(FMT.render_prompt(samples[0].question), return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_patience_stops_once_dev_stops_improving_and_a_rerun_trains_no_further(tmp_path, tiny_llama, samples,
                                                                             ray_local):
    from fcot.train.trainer import train

    data = curated(tmp_path / "data", samples[:4], repeat=4)  # 16 rows: 2 steps per epoch
    dev = tmp_path / "dev.jsonl"  # questions it never trains on: its dev accuracy soon stops improving
    dev.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples[4:8]))
    cfg = config(tmp_path, data, tiny_llama, "epochs=12", "patience=2", f"dev={{path: {dev}, max_new_tokens: 6}}")
    summary = train(cfg)
    accuracies = [d["accuracy"] for d in summary["dev"]]
    best = summary["best_epoch"]
    assert best == 1 + accuracies.index(max(accuracies)) == summary["selected_epoch"]
    # Stopped after the two evaluations that did not beat the best one, long before the 12 planned epochs.
    assert summary["stopped_early"] == summary["epochs"] == len(accuracies) == best + 2 < 12, accuracies
    assert summary["steps"] == 2 * summary["epochs"] and summary["planned_steps"] == 24
    again = train(cfg)  # the same output_dir: the run is over, nothing trains again
    assert again["steps"] == summary["steps"] and len(again["dev"]) == len(accuracies)


@pytest.mark.slow
def test_zero3_saves_gathered_weights_and_keeps_no_weights_in_its_last_checkpoint(tmp_path, tiny_llama, samples,
                                                                                   ray_local):
    """Under ZeRO-3 rank 0 saves the whole student (gathered, not its partition), the weights an unpartitioned
    (ZeRO-0) training of the same data reaches; the run's last checkpoint is its state alone (the student is saved),
    and the run, started again, trains nothing."""
    from fcot.train.trainer import CHECKPOINT_TAG, STATE_FILE, train

    data = curated(tmp_path / "data", samples[:4], repeat=4)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples[:2]))
    runs = {stage: config(tmp_path / f"zero{stage}", data, tiny_llama, "epochs=1", f"deepspeed.stage={stage}",
                          "grad_accum=2", f"dev={{path: {dev}, max_new_tokens: 4}}") for stage in (3, 0)}
    summary = train(runs[3])
    assert summary["steps"] == 2 and summary["dev"][0]["epoch"] == 1  # rank 0 evaluated a gathered copy
    last = Path(summary["checkpoint"])
    assert (last / STATE_FILE).exists() and not (last / CHECKPOINT_TAG).exists(), sorted(last.iterdir())
    assert train(runs[3])["steps"] == 2  # resumed from the state alone: nothing trains again

    from safetensors.torch import load_file

    saved = load_file(Path(summary["model_dir"]) / "model.safetensors")
    initial = load_file(Path(tiny_llama) / "model.safetensors")
    unpartitioned = load_file(Path(train(runs[0])["model_dir"]) / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert saved[name].shape == initial[name].shape == unpartitioned[name].shape  # gathered, not a [0] partition
    # The same training up to the order of sums (Adam magnifies it where a gradient is near 0): within a tenth of
    # the largest step the weights took.
    step = (unpartitioned[name] - initial[name]).abs().max()
    assert step > 0 and (saved[name] - unpartitioned[name]).abs().max() < 0.1 * step
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["model_dir"])  # loads without missing/unexpected weights


def test_sharded_data_trains_on_the_exact_loss_of_every_global_batch(tmp_path, tiny_llama, samples, ray_local):
    """shard_data: each of 2 workers tokenizes only its half of the curated set, and every step's loss is still
    the token-weighted mean over the whole global batch. With one global batch per epoch (all 16 rows, of
    different lengths), both modes step on the same batch, so their losses agree epoch after epoch."""
    from fcot.train.trainer import train

    data = curated(tmp_path / "data", samples[:8], repeat=2)  # 16 rows
    runs = {}
    for shard in ("false", "true"):
        runs[shard] = train(config(tmp_path / shard, data, tiny_llama, "batch_size=16", "epochs=3",
                                   "precision=fp32", f"shard_data={shard}"))
    whole, sharded = runs["false"], runs["true"]
    assert (whole["sharded_data"], sharded["sharded_data"]) == (False, True)
    assert (whole["examples_per_worker"], sharded["examples_per_worker"]) == (16, 8)
    assert whole["tokens"] == sharded["tokens"] and sharded["steps"] == 3
    assert sharded["loss_curve"] == pytest.approx(whole["loss_curve"], abs=2e-4), (sharded, whole)
    assert sharded["loss_curve"][-1] < sharded["loss_curve"][0] - 0.1  # it learned: the steps were not no-ops


@pytest.mark.slow
def test_t5_encoder_decoder_trains(tmp_path, samples, ray_local):
    from transformers import AutoModelForSeq2SeqLM

    from fcot.bundled import make_tiny_model
    from fcot.train.trainer import train

    texts = [s.question for s in samples] + ["We add the numbers in the question. So the answer is --> END"]
    t5 = make_tiny_model(tmp_path / "t5", "t5", vocab_texts=texts)
    data = curated(tmp_path / "data", samples[:4], repeat=2, encoder_decoder=True)
    summary = train(config(tmp_path, data, t5, "epochs=4", "num_workers=1", "deepspeed.stage=2"))
    assert summary["encoder_decoder"] and summary["steps"] == 4
    curve = summary["loss_curve"]
    assert all(loss == loss for loss in curve) and curve[-1] < curve[0], curve  # finite, and it learned
    assert AutoModelForSeq2SeqLM.from_pretrained(summary["model_dir"]).config.is_encoder_decoder is True
    with pytest.raises(FcotError, match="packing"):
        Collator(tokenizer(t5), 64, encoder_decoder=True, packing=True)


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_from_checkpoint(tmp_path, tiny_llama, samples, ray_local):
    import psutil

    from fcot.train.trainer import train

    data = curated(tmp_path / "data", samples, repeat=12)  # 96 rows: 12 steps per epoch
    # 6 epochs: the kill lands right after the first checkpoint with 60 steps of work left, on any machine.
    cfg = config(tmp_path, data, tiny_llama, "epochs=6", "deepspeed.stage=2", "max_failures=2")
    killed = []

    def kill_a_worker():
        deadline = time.time() + 300
        # a worker killed before the checkpoint is committed would take it with it
        while not epoch_committed(tmp_path / "out") and time.time() < deadline:
            time.sleep(0.1)
        # Our own Ray Train workers: descendants of this test process (it started the local cluster).
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "RayTrainWorker" in " ".join(_cmdline(p))]
        if workers:
            workers[-1].kill()
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    summary = train(cfg)
    killer.join(timeout=10)
    assert killed, "no training worker found to kill"
    assert summary["restarts"] == 1 and summary["resumed_from_step"] in (12, 24, 36, 48, 60)
    assert summary["steps"] == summary["planned_steps"] == 72 and len(summary["loss_curve"]) == 72
    assert Path(summary["model_dir"], "model.safetensors").exists()


@pytest.mark.slow
def test_a_worker_node_lost_mid_training_resumes_from_the_last_checkpoint(tmp_path, tiny_llama, samples, lose_a_node):
    """Two training workers, one on each of two one-CPU worker nodes of a ray.cluster_utils.Cluster: the node of
    one removed without grace once the first epoch's checkpoint is committed, a fresh node added. The group
    restarts from that checkpoint on the nodes it then has and ends after exactly the planned steps."""
    import yaml

    data = curated(tmp_path / "data", samples, repeat=12)  # 96 rows: 12 steps per epoch
    cfg = config(tmp_path, data, tiny_llama, "epochs=3", "deepspeed.stage=2", "max_failures=2", "cpus_per_worker=1")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    summary = lose_a_node("train", path)["result"]
    assert summary["restarts"] == 1 and summary["resumed_from_step"] in (12, 24), summary
    assert summary["steps"] == summary["planned_steps"] == 36 and len(summary["loss_curve"]) == 36
    assert Path(summary["model_dir"], "model.safetensors").exists()


@pytest.mark.slow
def test_a_training_whose_lost_node_is_not_replaced_stops_naming_the_key(tmp_path, tiny_llama, samples, lose_a_node):
    """The same two workers on two one-CPU nodes, one node removed after the first epoch's checkpoint and none added
    (an autoscaler out of capacity): Ray Train would retry placing the group forever; fcot stops after
    PLACEMENT_TRIES worker-group start timeouts (10 s each here) with one message naming the key, and the
    committed checkpoint is kept for the same command to resume from."""
    import yaml

    from fcot.train.trainer import PLACEMENT_TRIES

    data = curated(tmp_path / "data", samples, repeat=12)
    cfg = config(tmp_path, data, tiny_llama, "epochs=3", "deepspeed.stage=2", "max_failures=2", "cpus_per_worker=1")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    out = lose_a_node("train", path, replace=False, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}, error=True)
    assert out["error"].startswith(
        f"FcotError: train.num_workers: the cluster could not place 2 training workers (train.cpus_per_worker=1 each) "
        f"in {PLACEMENT_TRIES} tries of 10 s"), out["error"]
    assert epoch_committed(tmp_path / "out")


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # the process ended meanwhile
        return []


@pytest.mark.slow
def test_fcot_train_logged_to_wandb_prints_each_progress_line_once(tmp_path, tiny_llama, samples, ray_local):
    """W&B wraps a worker's sys.stdout, and Ray Train's print patch then sent each line to it and to its logger:
    the driver showed every progress line twice."""
    data = curated(tmp_path / "data", samples[:4], repeat=4)  # 16 rows: 2 steps of 8
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"data: {data}\nmodel: {tiny_llama}\noutput_dir: {tmp_path / 'out'}\nnum_workers: 1\n"
                   "batch_size: 8\nepochs: 1\nwandb: {mode: offline}\n")
    proc = run_fcot("train", cfg, env={"WANDB_DIR": str(tmp_path)}, check=True, cluster=ray_local)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "[train] 2/2 steps (100%)" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr


def test_cli_train_rejects_bad_config(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: nowhere\nbatch_size: 6\n")
    proc = run_fcot("train", cfg, "num_workers=4")
    assert proc.returncode == 2 and "must be divisible by num_workers" in proc.stderr, proc.stderr
    proc = run_fcot("train", cfg, "batch_size=8", "num_workers=2")
    # paths resolve against the directory the command ran in (run_fcot: the repository root)
    assert proc.returncode == 2 and f"data {ROOT / 'nowhere'}: not found" in proc.stderr, proc.stderr


def test_packed_attention_honours_a_sliding_window_and_refuses_a_soft_cap():
    """Mistral/Qwen-style students keep their window under packing; a Gemma-2-style soft cap is refused by name."""
    from types import SimpleNamespace

    import torch

    from fcot.errors import FcotError
    from fcot.train.attention import packed_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    module = SimpleNamespace(num_key_value_groups=1)

    def reference(q, k, v, window):  # one example, attention written out
        n = q.shape[2]
        i = torch.arange(n)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        return ((q @ k.transpose(-1, -2)) / 8 ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1) @ v

    for window in (3, None):
        out, _ = packed_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6, sliding_window=window)
        want = torch.cat([reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], window or 10)
                          for a, b in ((0, 4), (4, 10))], 2).transpose(1, 2)
        assert torch.allclose(out, want, atol=1e-5), window
    with pytest.raises(FcotError, match="softcap.*set train.packing: false"):
        packed_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6, softcap=50.0)


@pytest.mark.parametrize("signature", ["2.9", "2.11"])
def test_the_varlen_kernel_is_called_right_on_every_signature_torch_has_had(signature):
    """On CUDA, packed attention is one torch.nn.attention.varlen call, whose keywords changed: torch 2.9 takes
    `is_causal` and neither `scale` nor `enable_gqa`, 2.11 `window_size`, `scale` and `enable_gqa`. A kernel of each
    signature (computed here with SDPA per example, keyword-only as torch's) gets only keywords it has, and the
    result equals the per-example path's, with a custom scale and grouped key/value heads."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from fcot.train.attention import packed_attention, varlen_call

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=None, gqa=False):
        out = []
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            one = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            assert gqa or one[1].shape[0] == one[0].shape[0], "grouped heads passed to a kernel without enable_gqa"
            out.append(F.scaled_dot_product_attention(*one, is_causal=causal, scale=scale, enable_gqa=gqa))
        return torch.cat(out, 1).transpose(0, 1)

    def old(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None):
        return kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal)

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        return kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale, enable_gqa)

    fn = old if signature == "2.9" else new
    causal = {"is_causal": True} if signature == "2.9" else {"window_size": (-1, 0)}
    varlen = (fn, causal, set(__import__("inspect").signature(fn).parameters))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want, _ = packed_attention(SimpleNamespace(num_key_value_groups=2), q, k, v, None, scaling=0.2,
                               cu_seq_lens_q=cu, max_length_q=6)
    got = varlen_call(varlen, q, k, v, cu, 6, 0.2, 2, None)
    assert torch.allclose(got, want, atol=1e-5)
    assert (varlen_call(varlen, q, k, v, cu, 6, 0.2, 2, 3) is None) == (signature == "2.9")  # a window: 2.11 only


# Two curated pairs of the Fine-tune-CoT format: their rationales, prompts and completions (` {rationale} --> {answer}
# END`), for the objectives that learn a teacher's distribution at the rationale's tokens.
RATIONALE_PAIRS = ([" There are 3 cars and 2 more arrive, so 3 + 2 = 5.", " Tom has 12 apples and gives away 5."],
                   ["There are 3 cars and 2 more arrive. How many cars? ###", "Tom has 12 apples. How many left? ###"],
                   [" There are 3 cars and 2 more arrive, so 3 + 2 = 5. --> 5 END",
                    " Tom has 12 apples and gives away 5. --> 7 END"])


@pytest.mark.parametrize("temperature, alpha, tail", [(2.0, 0.7, False), (1.0, 0.5, False), (1.0, 0.5, True),
                                                     (2.0, 0.7, True)])
def test_kd_loss_is_exact_under_packing_and_aligns_the_teachers_rationale_tokens(tiny_llama, temperature, alpha, tail):
    """The teacher's rationale tokens, re-tokenized inside the student's completion (` {rationale} --> {answer}
    END`, the same tokenizer), all get its top-k; the KD loss sum is the same padded or packed, and equals
    (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher at T || student at T), computed here position by
    position from a full forward pass: over the renormalized top k, or (tail) over the top k and the rest as one
    outcome. At T = 1 the trainer reads the cross-entropy's log-softmax."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fcot.train import attention
    from fcot.train.config import ObjectiveConfig
    from fcot.train.data import teacher_targets
    from fcot.train.objectives import loss_sum

    tok = tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rationales, prompts, completions = RATIONALE_PAIRS
    g = torch.Generator().manual_seed(0)
    k, vocab = 4, model.config.vocab_size
    logprobs = []
    for r in rationales:  # a made-up teacher: its emitted tokens, and k ids with logprobs at each (as stored)
        emitted = tok(r, add_special_tokens=False).input_ids
        top = [[t] + torch.randint(0, vocab, (k - 1,), generator=g).tolist() for t in emitted]
        values = torch.log_softmax(torch.randn(len(emitted), k + 3, generator=g), -1)[:, :k]  # some mass left out
        logprobs.append((np.array(emitted), np.array(top, np.int32), values.numpy().astype(np.float16)))
    objective = ObjectiveConfig(kind="kd", temperature=temperature, alpha=alpha, tail=tail)
    losses = []
    for packing in (False, True):
        c = Collator(tok, 160, encoder_decoder=False, packing=packing)
        encoded = c.encode(prompts, completions)
        targets = [teacher_targets(e, lp) for e, lp in zip(encoded, logprobs)]
        assert [len(t[0]) for t in targets] == [len(lp[0]) for lp in logprobs]  # every rationale token
        if packing:
            model.set_attn_implementation(attention.NAME)
        with torch.no_grad():
            losses.append(loss_sum(model, c.collate(encoded, targets=targets), False, objective)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
    model.set_attn_implementation("sdpa")
    ce = kl = 0.0
    for e, (positions, tops, lps) in zip(encoded, targets):
        ids, labels = e
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        ce += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE,
                                                reduction="sum")
        for pos, top, lp in zip(positions, tops, lps):
            t_lp = torch.tensor(lp, dtype=torch.float32)
            q = torch.log_softmax(logits[pos - 1] / temperature, -1)[torch.tensor(top, dtype=torch.long)]
            if tail:  # k + 1 outcomes: the teacher's rest, tempered as one, and the student's exact rest at T
                t_lp = torch.cat([t_lp, torch.log1p(-t_lp.exp().sum()).view(1)])
                q = torch.cat([q, torch.log1p(-q.exp().sum()).view(1)])
            p = torch.softmax(t_lp / temperature, -1)
            kl += temperature ** 2 * (p * (p.log() - q)).sum()
    assert torch.allclose(losses[0], (1 - alpha) * ce + alpha * kl, rtol=1e-4), (losses[0], ce, kl)
    assert not torch.allclose(losses[0], ce, rtol=1e-3)  # the KD term counts


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_on_policy_loss_is_exact_under_packing_at_the_graded_tokens_only(tiny_llama, divergence):
    """fcot.rollout's rows: the student's own sample as the completion, its rationale's tokens graded (column 0 the
    sampled token with the teacher's logprob of it, then the teacher's top 3). The on_policy loss sum is the same
    padded or packed, counts the graded tokens only (not ` --> answer END`, nor the EOS), and equals, from a full
    forward pass position by position, the sum of log p_student - log p_teacher of each sampled token (reverse KL)
    or GKD's JSD over the teacher's top 3 (beta 0.3)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fcot.train import attention
    from fcot.train.config import ObjectiveConfig
    from fcot.train.data import teacher_targets
    from fcot.train.objectives import jsd_sum, loss_sum

    tok = tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rationales, prompts, completions = RATIONALE_PAIRS
    g = torch.Generator().manual_seed(0)
    graded = []
    for r in rationales:
        sampled = tok(r, add_special_tokens=False).input_ids
        top = [[t] + torch.randint(0, model.config.vocab_size, (3,), generator=g).tolist() for t in sampled]
        values = torch.log_softmax(torch.randn(len(sampled), 6, generator=g), -1)[:, :4]
        graded.append((np.array(sampled), np.array(top, np.int32), values.numpy().astype(np.float16)))
    objective = ObjectiveConfig(kind="on_policy", divergence=divergence, beta=0.3)
    results = []
    for packing in (False, True):
        c = Collator(tok, 160, encoder_decoder=False, packing=packing)
        encoded = c.encode(prompts, completions)
        targets = [teacher_targets(e, lp) for e, lp in zip(encoded, graded)]
        if packing:
            model.set_attn_implementation(attention.NAME)
        with torch.no_grad():
            results.append(loss_sum(model, c.collate(encoded, targets=targets), False, objective))
    model.set_attn_implementation("sdpa")
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5), results
    assert int(results[0][1]) == sum(len(s) for s, _, _ in graded) < sum(Collator.label_tokens(e) for e in encoded)
    want = 0.0
    for (ids, _), (positions, tops, lps) in zip(encoded, targets):
        with torch.no_grad():
            logits = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for pos, top, lp in zip(positions, tops, lps):
            student, teacher = logits[pos - 1], torch.tensor(lp, dtype=torch.float32)
            if divergence == "reverse_kl":
                want += student[int(top[0])] - teacher[0]
            else:
                want += jsd_sum(student[torch.tensor(top[1:], dtype=torch.long)][None], teacher[None, 1:], 0.3)
    assert torch.allclose(results[0][0], torch.as_tensor(want), rtol=1e-4, atol=1e-5), (results[0][0], want)


def test_kd_tail_bucket_is_the_exact_kl_when_the_teachers_tail_is_one_token():
    """With a vocabulary of k + 1 tokens the teacher's tail is one token: the KL with the tail bucket is the full
    KL(teacher || student), to float precision; the renormalized top-k KL is not."""
    from fcot.train.objectives import kl_sum

    g = torch.Generator().manual_seed(3)
    k = 6
    teacher = torch.log_softmax(torch.randn(5, k + 1, generator=g) * 2, -1)
    student = torch.log_softmax(torch.randn(5, k + 1, generator=g) * 2, -1)
    top = teacher.topk(k, -1).indices
    full = (teacher.exp() * (teacher - student)).sum()
    with_tail = kl_sum(student.gather(-1, top), teacher.gather(-1, top), 1.0, tail=True)
    assert torch.allclose(with_tail, full, rtol=1e-5), (with_tail, full)
    assert not torch.allclose(kl_sum(student.gather(-1, top), teacher.gather(-1, top), 1.0, tail=False), full,
                              rtol=1e-2)


def test_zero_stage_auto_honours_offload_and_qlora_and_explicit_ones_are_refused_naming_the_keys(tmp_path):
    """ZeRO-Offload with stage auto never picks ZeRO-0 (DeepSpeed's CPU Adam asserts there); a QLoRA student never
    gets ZeRO-3 (a 4-bit base cannot be partitioned): auto stops at 2, or says what to change. Set by hand, both
    combinations are refused by the config, naming the keys."""
    from fcot.train.trainer import zero_stage

    base = {"data": str(tmp_path), "model": "smollm2-135m", "num_workers": 2, "batch_size": 2}
    plain = load_config(TrainConfig, base=base)
    offload = load_config(TrainConfig, base={**base, "deepspeed": {"offload_optimizer": True}})
    gib = 2 ** 30
    assert zero_stage(plain, 10 ** 6, 64 * gib, 2) == 0 and zero_stage(offload, 10 ** 6, 64 * gib, 2) == 1
    assert zero_stage(offload, 10 ** 9, 4 * gib, 2) == 3  # too big for 1 and 2: offload and ZeRO-3
    qlora = load_config(TrainConfig, base={**base, "use_gpu": True, "lora": {"quantize": "4bit"}})
    assert zero_stage(qlora, 8 * 10 ** 9, 40 * gib, 2, trainable=4 * 10 ** 7) == 0  # 4 GB of 4-bit weights fit
    with pytest.raises(FcotError, match=r"train.lora.quantize: .* cannot be partitioned by ZeRO-3"):
        zero_stage(qlora, 70 * 10 ** 9, 40 * gib, 2, trainable=4 * 10 ** 8)
    with pytest.raises(FcotError, match=r"deepspeed.offload_optimizer: ZeRO-Offload needs ZeRO stage 1, 2 or 3"):
        load_config(TrainConfig, base={**base, "deepspeed": {"stage": 0, "offload_optimizer": True}})
    with pytest.raises(FcotError, match=r"lora.quantize: a 4-bit QLoRA base cannot be partitioned by ZeRO-3"):
        load_config(TrainConfig, base={**base, "use_gpu": True, "lora": {"quantize": "4bit"},
                                       "deepspeed": {"stage": 3}})


def test_on_policy_losses_on_hand_computed_cases():
    """The reverse KL at two sampled tokens whose student and teacher probabilities are (1/2, 1/4) and (1/4, 1/2):
    the value is the sum of the log-ratios (ln 2 - ln 2 = 0), the gradient at each token's student logprob its own
    log-ratio (ln 2, then -ln 2), and through the logits ratio x (one-hot - p). GKD's JSD at beta 0, 1/2 and 1 on
    two-point distributions, against the definitions."""
    import math

    from fcot.train.objectives import jsd_sum, reverse_kl_sum

    student = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    teacher = torch.tensor([math.log(0.25), math.log(0.5)])
    loss = reverse_kl_sum(student, teacher)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert torch.allclose(student.grad, torch.tensor([math.log(2), -math.log(2)]))

    logits = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)  # one position, the sampled token is 1
    lp = torch.log_softmax(logits, -1)
    reverse_kl_sum(lp[0, 1:2], torch.tensor([math.log(0.5)])).backward()
    p = torch.softmax(logits.detach(), -1)[0]
    ratio = math.log(p[1].item()) - math.log(0.5)
    assert torch.allclose(logits.grad[0], ratio * (torch.tensor([0.0, 1.0, 0.0]) - p), atol=1e-6)

    P, Q = [0.5, 0.5], [0.25, 0.75]  # teacher's top 2 (unnormalized logprobs: renormalized), student's there

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    top = torch.log(torch.tensor([[0.3, 0.3]]))
    q = torch.log(torch.tensor([[0.1, 0.3]]))  # renormalized: Q
    for beta in (0.0, 0.5, 1.0):
        m = [beta * x + (1 - beta) * y for x, y in zip(P, Q)]
        want = kl(P, Q) if beta == 0 else kl(Q, P) if beta == 1 else beta * kl(P, m) + (1 - beta) * kl(Q, m)
        assert abs(jsd_sum(q, top, beta).item() - want) < 1e-6, beta
