#!/usr/bin/env bash
# CUDA checks for a machine with a GPU: the test suite's CUDA cases, then the quantizer/step
# benchmark on the GPU. Usage: bash benchmarks/cuda_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-cuda-check}"
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q -m cuda tests 2>&1 | tee "$out/tests.txt"
python3 benchmarks/bench_quant.py --device cuda --json 2>&1 | tee "$out/bench_quant.txt"
