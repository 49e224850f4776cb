"""The hf engine's seeded sampling: right distribution, top-p respected, and a sample is the same whether it is
generated alone or in any batch, on whatever device is here (CUDA included, where there is one)."""

import pytest
import torch

from fcot.engines import (
    GUMBEL_RANGE,
    EngineConfig,
    Grade,
    HFEngine,
    Request,
    _SeededSampler,
    _unit,
    build_engine,
    gumbel_noise,
)
from tests.conftest import run_fcot

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gumbel_max_samples_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]], device=DEVICE)
    temperature, n = 0.7, 20000
    sampler = _SeededSampler(list(range(n)), temperature, 1.0, prompt_width=3)
    picked = sampler(torch.zeros((n, 3), dtype=torch.long, device=DEVICE), logits.expand(n, -1)).argmax(-1)
    freq = torch.bincount(picked.cpu(), minlength=5).float() / n
    expected = torch.softmax(logits[0].cpu() / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # 20k samples: ~0.004 standard error
    assert freq[4] == 0  # 30 below the best: never, exactly as the pruning range says


def test_top_p_keeps_the_nucleus_only_and_noise_depends_on_seed_position_token_only():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]], device=DEVICE).expand(4000, -1)
    picked = _SeededSampler(list(range(4000)), 1.0, 0.8, 1)(torch.zeros((4000, 1), dtype=torch.long,
                                                                        device=DEVICE), logits).argmax(-1)
    assert set(picked.tolist()) == {0, 1}  # the top two carry 0.87 of the mass: the rest is cut
    seeds = torch.tensor([7, 8], device=DEVICE)
    a = gumbel_noise(seeds, 5, torch.tensor([[1, 2, 3], [1, 2, 3]], device=DEVICE))
    b = gumbel_noise(seeds[:1], 5, torch.tensor([[3, 2]], device=DEVICE))
    assert a[0, 2] == b[0, 0] and a[0, 1] == b[0, 1] and a[0, 0] != a[1, 0]
    assert gumbel_noise(seeds, 6, torch.tensor([[1], [1]], device=DEVICE))[0, 0] != a[0, 0]
    assert float(a.max()) < GUMBEL_RANGE


def test_the_extreme_hashes_give_finite_noise_within_the_pruning_range():
    u = _unit(torch.tensor([0, 0xFF, 0xFFFFFFFF], dtype=torch.long, device=DEVICE))  # lowest and highest 24 bits
    assert bool(((u > 0) & (u < 1)).all()), u
    noise = -torch.log(-torch.log(u))
    assert bool(noise.isfinite().all()) and float(noise.max() - noise.min()) < GUMBEL_RANGE, noise


def test_hf_sampling_is_batch_independent_on_this_device(tiny_llama):
    engine = HFEngine(str(tiny_llama), dtype="float32", device=DEVICE, batch_size=8)
    prompts = ["Q: There are 3 cars and 2 more arrive. How many cars?\nA: Let's think step by step.",
               "Q: Tom has 12 apples and gives away 5. How many are left?\nA: Let's think step by step.",
               "Q: A coin is heads up. Ann flips the coin. Is the coin still heads up?\nA:"]
    requests = [Request(prompt=p, max_new_tokens=12, temperature=0.7, top_p=0.95, seed=100 + 10 * i + k)
                for i, p in enumerate(prompts) for k in range(3)]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    engine.batch_size = 2  # other batches, other padding
    pairs = engine.generate(requests[::-1])[::-1]
    assert [c.text for c in together] == [c.text for c in alone] == [c.text for c in pairs]
    assert len({c.text for c in together[:3]}) > 1  # the D samples of a question differ
    greedy = engine.generate([Request(prompt=prompts[0], max_new_tokens=12)])[0]
    assert greedy.text == engine.generate([Request(prompt=prompts[0], max_new_tokens=12)] * 2)[1].text


def test_one_engine_config_builds_the_engines_of_teacher_and_evaluation(tiny_llama):
    cfg = EngineConfig(kind="hf", model=str(tiny_llama), dtype="float32")
    assert isinstance(build_engine(cfg), HFEngine) and cfg.batch_size == 32
    assert EngineConfig(kind="vllm").batch_size == 256  # continuous batching wants many sequences in flight
    vllm = EngineConfig(kind="vllm", gpus_per_replica=4, tensor_parallel_size=4, replicas=3)
    [d] = vllm.demands("eval.engine.", "evaluation engine replicas")
    assert d.count == 3 and d.unit["GPU"] == 4 and d.unit_keys["GPU"] == "eval.engine.tensor_parallel_size"
    with pytest.raises(ValueError, match=r"gpus_per_replica \(2\) differs from engine.tensor_parallel_size \(4\)"):
        EngineConfig(kind="vllm", gpus_per_replica=2, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="base_url"):
        EngineConfig(kind="openai")


def test_hf_logprobs_are_the_models_own_top_k_at_each_emitted_token_and_change_no_sample(tiny_llama):
    """The top-k logprobs the hf engine returns are those of a teacher-forced forward pass over prompt + emitted
    tokens (the raw log-softmax, before temperature and noise, and before what the model's generation_config adds:
    a repetition penalty here), for greedy and sampled rows in a padded batch; the texts are those generated without
    logprobs."""
    engine = HFEngine(str(tiny_llama), dtype="float32", device=DEVICE, batch_size=8)
    engine.model.generation_config.repetition_penalty = 1.8  # a processor transformers runs before any of fcot's
    prompts = ["Q: There are 3 cars and 2 more arrive. How many cars?\nA: Let's think step by step.",
               "Q: Tom has 12 apples?\nA:"]
    penalized = []
    for temperature in (0.0, 0.7):
        plain = [Request(prompt=p, max_new_tokens=10, temperature=temperature, seed=5 + i)
                 for i, p in enumerate(prompts)]
        asked = [Request(**{**r.__dict__, "logprobs": 4}) for r in plain]
        got, before = engine.generate(asked), engine.generate(plain)
        assert [c.text for c in got] == [c.text for c in before] and all(c.logprobs is None for c in before)
        for prompt, c in zip(prompts, got):
            lp = c.logprobs
            assert len(lp.tokens) == len(lp.top_ids) == len(lp.top_logprobs) == c.completion_tokens > 0
            ids = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(DEVICE)
            full = torch.cat([ids, torch.tensor([lp.tokens], device=DEVICE)], dim=1)
            with torch.no_grad():
                logits = engine.model(full).logits[0, ids.shape[1] - 1:-1].float()
            values, top = torch.log_softmax(logits, -1).topk(4, dim=-1)
            assert lp.top_ids == top.tolist()
            assert torch.allclose(torch.tensor(lp.top_logprobs), values.cpu(), atol=1e-4)
            if temperature == 0:  # greedy emits the top token of the penalized scores: not always the raw top one
                penalized.append(lp.tokens != [t[0] for t in lp.top_ids])
    assert any(penalized)  # the penalty changed what greedy emitted, and the logprobs stayed raw


def test_hf_grades_a_given_continuation_as_its_own_sample_and_alike_in_any_batch(tiny_llama):
    """Grading (on-policy distillation: the teacher scores the student's tokens): the logprob of each given token
    and the top k there are those the engine reports when it samples the same tokens itself, and a row's grade is
    the same alone as in a left-padded batch of other lengths (its positions start at its own first token)."""
    engine = HFEngine(str(tiny_llama), dtype="float32", device=DEVICE, batch_size=8)
    prompts = ["Q: There are 3 cars and 2 more arrive. How many cars?\nA: Let's think step by step.",
               "Q: Tom has 12 apples?\nA:", "Q: 7 birds?"]
    sampled = engine.generate([Request(prompt=p, max_new_tokens=6 + 3 * i, temperature=0.7, seed=i, logprobs=3)
                               for i, p in enumerate(prompts)])
    grades = [Grade(tuple(c.logprobs.tokens), prompt=p, logprobs=3) for p, c in zip(prompts, sampled)]
    batched, alone = engine.grade(grades), [engine.grade([g])[0] for g in grades]
    for c, b, a in zip(sampled, batched, alone):
        assert b.tokens == c.logprobs.tokens and len(b.token_logprobs) == len(b.tokens) == c.completion_tokens
        assert b.top_ids == c.logprobs.top_ids == a.top_ids
        assert torch.allclose(torch.tensor(b.top_logprobs), torch.tensor(c.logprobs.top_logprobs), atol=1e-4)
        assert torch.allclose(torch.tensor(b.token_logprobs), torch.tensor(a.token_logprobs), atol=1e-4)
        for token, lp, ids, values in zip(b.tokens, b.token_logprobs, b.top_ids, b.top_logprobs):
            assert lp <= values[0] + 1e-5 and (token not in ids or abs(lp - values[ids.index(token)]) < 1e-5)
    assert engine.grade([Grade((5, 6), prompt="Q: 7 birds?")])[0].top_ids == [[], []]  # k = 0: the tokens only


def test_fcot_models_prepare_says_which_copy_it_made_and_keeps(tmp_path):
    env = {"FCOT_MODELS_DIR": str(tmp_path / "models")}
    first = run_fcot("models", "prepare", "tiny-llama", env=env, check=True).stderr
    folder = tmp_path / "models" / "tiny-llama"
    assert f"tiny-llama: ready at {folder} (a random llama model, built locally)" in first
    again = run_fcot("models", "prepare", "tiny-llama", env=env, check=True).stderr
    assert f"tiny-llama: already prepared at {folder} (a random llama model, built locally)" in again
