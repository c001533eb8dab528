#!/usr/bin/env bash
# The GPU check, one command on one GPU: ViT-B/16 at 224 px, batch 256, r = 0, 8, 16, beside timm's and transformers'
# ViT of the same shape, with peak memory, the FLOP limit and a host-sync check around each merged forward.
#   1. eager, every merge mode, fp16 and bf16 (about 40 s on one H200) -> results/gpu_check_eager.{md,csv,png}
#   2. eager and torch.compile'd, fp16, bipartite and ward -> results/gpu_check_compiled.{md,csv,png}
# Submodular is not compiled here: inductor took over 2 minutes on its r=16 graph on an H200 without finishing.
#
#   bash benchmarks/gpu_check.sh          # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --cpu    # the same path on tiny shapes on the CPU (what the tests run; ~20 s)
#
# PYTHON (default .venv/bin/python) and NAME (results file stem) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if [[ "${1:-}" == "--cpu" ]]; then
    # Tiny shapes, two layers, dynamo without a code generator: checks the script, not the speed.
    exec "$PYTHON" benchmarks/throughput.py --name "${NAME:-gpu_check_cpu}" --device cpu --dtypes bf16 \
        --preset ViT-Ti_16 --layers 2 --image_size 32 --batch_size 2 --r_values 2 --repeats 2 --warmup 1 \
        --compile --compile_backend eager --sync_check
elif [[ $# -gt 0 ]]; then
    echo "error: unknown argument $1 (the only option is --cpu)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device here; bash benchmarks/gpu_check.sh --cpu runs the CPU path" >&2
    exit 2
fi
COMMON=(--device cuda --preset ViT-B_16 --image_size 224 --batch_size 256 --r_values 8 16 --repeats 5 --warmup 3
        --iters 3)
"$PYTHON" benchmarks/throughput.py --name "${NAME:-gpu_check}_eager" "${COMMON[@]}" --dtypes fp16 bf16 --sync_check
"$PYTHON" benchmarks/throughput.py --name "${NAME:-gpu_check}_compiled" "${COMMON[@]}" --dtypes fp16 \
    --modes bipartite ward --compile
