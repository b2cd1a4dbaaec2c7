#!/usr/bin/env bash
# Create .venv and install the suite with everything it needs (torch, torchvision, snakemake, dvc,
# mlflow, the report stack, pytest) from PyPI. Idempotent: re-running does nothing unless
# pyproject.toml, the constraints or MASKCONNECT_TORCH_INDEX_URL changed.
#
# torch's CUDA build: PyPI's torch 2.15.0 is built for CUDA 13 (NVIDIA driver R580 or newer). For an
# older driver, or a CPU-only box, point MASKCONNECT_TORCH_INDEX_URL at a PyTorch wheel index, e.g.
#   MASKCONNECT_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh
# It is passed to pip as --extra-index-url: the same pinned versions, that index's build of them
# (pip prefers torch 2.15.0+cu126 there to PyPI's 2.15.0). Changing it reinstalls torch and torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: Python >= 3.10 is required (found: $("$PY" --version 2>&1))" >&2; exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.maskconnect-installed
index=${MASKCONNECT_TORCH_INDEX_URL:-}
index_args=()
[ -z "$index" ] || index_args=(--extra-index-url "$index")
want=$( (cat pyproject.toml requirements/constraints.txt 2>/dev/null; [ -z "$index" ] || echo "torch index: $index") \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the suite into .venv (first time: a few minutes, torch is large)" >&2
  had_torch=$(.venv/bin/python -c "import torch" 2>/dev/null && echo yes || true)
  # pip's output without one harmless warning; pipefail keeps pip's exit status (grep's "no line left"
  # is not a failure), so a failed install stops here and the stamp below is not written
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt \
      ${index_args[@]+"${index_args[@]}"} -e ".[all]" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    echo "setup: pip install failed (above); .venv is not marked installed, rerun after fixing it" >&2
    exit 1
  fi
  # torch was already there and the index changed: the install above kept the old build (same version)
  if [ -n "$had_torch" ] && [ "$(cat .venv/.maskconnect-torch-index 2>/dev/null)" != "$index" ]; then
    echo "setup: reinstalling torch and torchvision from ${index:-PyPI}" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall -c requirements/constraints.txt \
      ${index_args[@]+"${index_args[@]}"} torch torchvision
  fi
  echo "$index" > .venv/.maskconnect-torch-index
  .venv/bin/python -c "import maskconnect, torch, torchvision" # fail here, not later, if the install broke
  echo "$want" > "$stamp"
fi
