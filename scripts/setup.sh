#!/usr/bin/env bash
# Create .venv and install the suite with everything it needs (torch, torchvision, snakemake, dvc,
# mlflow, the report stack, pytest) from PyPI. Idempotent: re-running does nothing unless
# pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: Python >= 3.10 is required (found: $("$PY" --version 2>&1))" >&2; exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.maskconnect-installed
want=$(cat pyproject.toml requirements/constraints.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the suite into .venv (first time: a few minutes, torch is large)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[all]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv/bin/python -c "import maskconnect, torch, torchvision" # fail here, not later, if the install broke
  echo "$want" > "$stamp"
fi
