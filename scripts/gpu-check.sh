#!/usr/bin/env bash
# The GPU session script: everything only a GPU can show, in at most about 8 minutes, in one call.
#
#   1. maskconnect preflight on the paper grid (every {D,w,C}, learned and random K of the paper's
#      tables; memory at the paper's batches; step times and the GPU-hours of all 109 runs)  <= 220 s
#   2. python -m bench all --device cuda (throughput, memory, mixing, projection, cuda-check, ...) <= 180 s
#   3. the CUDA tests (tests/test_cuda.py: saving vs plain and compiled vs eager on the device)  <= 60 s
#
# Records: results/preflight/paper/preflight.{json,md}, copied with every benchmark record to
# bench/results/ (file names carry the GPU model and a UTC tag); commit bench/results/ afterwards and
# copy the preflight's GPU-hours into the README. Each step has its own time limit, and a step that
# fails or times out does not stop the next one; the exit code is non-zero if any step failed.
#
# Needs torch with CUDA, torchvision, numpy, pyyaml, jsonschema and pytest (the suite's core
# dependencies; mlflow, snakemake and dvc are not used). Runs from a checkout with the source on
# PYTHONPATH; no install and no network. PYTHON (default: .venv/bin/python if present, else python3)
# picks the interpreter. GPU_CHECK_DEVICE (default cuda) exists for testing this script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEV=${GPU_CHECK_DEVICE:-cuda}
TAG=$(date -u +%Y%m%dT%H%M%SZ)
BENCH_OUT=${GPU_CHECK_BENCH_OUT:-bench/results}
PF_OUT=${GPU_CHECK_PREFLIGHT_OUT:-results/preflight/paper}
GRID=${GPU_CHECK_GRID:-paper}
T_PREFLIGHT=${GPU_CHECK_T_PREFLIGHT:-220} T_BENCH=${GPU_CHECK_T_BENCH:-180} T_TESTS=${GPU_CHECK_T_TESTS:-60}

missing=$("$PY" - <<'EOF'
import importlib
print(" ".join(m for m in ("torch", "torchvision", "numpy", "yaml", "jsonschema", "pytest")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu-check: missing Python packages: $missing (install the suite's core dependencies, or carry them as wheels)" >&2
    exit 2
fi
"$PY" -c "import torch; print('gpu-check: torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPUs:', torch.cuda.device_count(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
mkdir -p "$BENCH_OUT" "$PF_OUT"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, remember a failure
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "gpu-check: == $name (limit ${limit} s)" >&2
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "gpu-check: == $name: exit $rc after $((SECONDS - t0)) s" >&2
    [ "$rc" = 0 ] || status=1
}

step "preflight --grid $GRID" "$T_PREFLIGHT" "$PY" -m maskconnect preflight --grid "$GRID" --device "$DEV" --out "$PF_OUT"
if [ -f "$PF_OUT/preflight.json" ]; then
    kind=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['environment']['device_kind'])" "$PF_OUT/preflight.json")
    cp "$PF_OUT/preflight.json" "$BENCH_OUT/preflight-$GRID-$kind-$TAG.json"
    cp "$PF_OUT/preflight.md" "$BENCH_OUT/preflight-$GRID-$kind-$TAG.md"
fi
if [ "$DEV" = cuda ]; then
    step "bench all" "$T_BENCH" "$PY" -m bench all --device cuda --tag "$TAG" --out "$BENCH_OUT" --steps 5 --warmup 2
    step "CUDA tests" "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
else  # testing this script without a GPU: the same steps, CPU-sized
    step "bench all" "$T_BENCH" "$PY" -m bench all --device cpu --quick --tag "$TAG" --out "$BENCH_OUT"
    step "CUDA tests (collected only: no GPU)" "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py
fi
echo "gpu-check: records in $BENCH_OUT (tag $TAG) and $PF_OUT; $([ $status = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')" >&2
exit $status
