#!/usr/bin/env bash
# The main job. Until the pipeline lands this describes the paper's models; see README.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for arch in 20,4,8 29,8,8 29,64,8; do
  .venv/bin/maskconnect describe --dataset cifar100 --arch $arch --connectivity random --fan-in 4
done
