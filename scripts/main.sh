#!/usr/bin/env bash
# The main job: set up (if needed), then the embedded default pipeline (demo grid: digits, CPU) end to
# end: 18 training runs, evaluation, tables, figures and paper_tables/demo/REPORT.md, MLflow store in
# results/mlflow.db. Extra arguments go to snakemake (e.g. --config grid=cifar100, -n).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec snakemake --cores all "$@"
