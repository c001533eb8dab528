#!/usr/bin/env bash
# The GPU check, one command on one GPU (meant to take under 8 minutes, most of it compiling; not yet timed on a GPU):
# fp16 and bf16 throughput of ViT-B/16 at 224 px, batch 256, for r = 0, 8, 16, every merge mode, eager and
# torch.compile'd, beside timm's and transformers' ViT of the same shape; peak memory and the FLOP limit beside each;
# a host-sync check around each merged forward.
# Writes benchmarks/results/gpu_check.{md,csv,png}.
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
exec "$PYTHON" benchmarks/throughput.py --name "${NAME:-gpu_check}" --device cuda --dtypes fp16 bf16 \
    --preset ViT-B_16 --image_size 224 --batch_size 256 --r_values 8 16 --repeats 5 --warmup 3 --iters 3 \
    --compile --sync_check
