#!/usr/bin/env bash
# The prepared GPU check: `bash scripts/gpu_check.sh [OUT]`, at most 8 minutes on one GPU (H100: see README).
# 1. the CUDA-only tests (they skip on a CPU machine); 2. the `gpu`-flagged notebook cells; 3. scripts/gpu_check.py:
# MoCo v2 and synth-moco on ResNet-50 at 224 px in bf16 and fp16 (images/s, peak memory), evaluation on the GPU, and
# a 2-process NCCL run where two GPUs exist. Prints one table (also in OUT/gpu_check.md).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU here")'
echo "== CUDA-only tests"
timeout 180 python -m pytest -q -rs tests -k "cuda" 2>&1 | tail -8 | tee "$OUT/cuda_tests.txt"
echo "== gpu-flagged notebook cells"
timeout 120 nbdev_test --flags gpu --path nbs/03a_precision.ipynb 2>&1 | tail -5 | tee "$OUT/gpu_cells.txt"
echo "== throughput, memory, evaluation, NCCL"
timeout 300 python scripts/gpu_check.py --out "$OUT"
