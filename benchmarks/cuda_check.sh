#!/usr/bin/env bash
# CUDA checks for a machine with a GPU (about 8 minutes on an H100/H200 with DATA_DIR):
#   1. the test suite's CUDA cases (quantizers, optimizer wrapper, local training; eager and compiled);
#   2. the quantizer/step benchmark on the GPU, and the wire codec on the CPU with 1 thread and
#      with all (the codec phase of a GPU round runs there);
#   3. with DATA_DIR (holding FashionMNIST/raw): bench_round.py on CUDA (a round's clients one after
#      another against the batched cohort, fp32 and 8 bits, 8 and 32 clients), then 2 rounds of the
#      paper's 8-bit setting with the batched cohort (--cohort on, the CUDA default) and with clients
#      one at a time, compiled: accuracy must rise, and metrics.jsonl's phase_s splits each round's time.
# Usage: bash benchmarks/cuda_check.sh [OUT_DIR] [DATA_DIR]   (THREADS: torch CPU threads of the runs, default 1)
# The exit status is 1 if any step failed (each step's output is kept either way).
set -uo pipefail
out=$(realpath -m "${1:-cuda-check}")  # the paths as the caller meant them, before the cd below
data="${2:-}"
if [ -n "$data" ]; then
  [ -d "$data/FashionMNIST/raw" ] || { echo "$0: DATA_DIR $data has no FashionMNIST/raw" >&2; exit 2; }
  data=$(realpath "$data")
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
failed=0
mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt" || exit 1
"$python" -m pytest -q -m cuda -p no:cacheprovider --ignore=tests/flower tests 2>&1 | tee "$out/tests.txt" || failed=1
"$python" benchmarks/bench_quant.py --device cuda --json 2>&1 | tee "$out/bench_quant.txt" || failed=1
for threads in 1 "$(nproc)"; do
  "$python" benchmarks/bench_wire.py --models convnet --threads "$threads" 2>&1 | tee "$out/bench_wire-$threads.txt" \
    || failed=1
done
if [ -n "$data" ]; then
  for clients in 8 32; do
    OMP_NUM_THREADS="${THREADS:-1}" "$python" benchmarks/bench_round.py --device cuda --data_path "$data" \
      --clients "$clients" --json 2>&1 | tee "$out/bench_round-$clients.txt" || failed=1
  done
  for variant in on:on off:on; do
    cohort=${variant%%:*} compile=${variant#*:} name="q8-cohort-$cohort"
    rm -rf "$out/$name"
    OMP_NUM_THREADS="${THREADS:-1}" "$python" -m lptfl run --dataset fmnist --data_path "$data" --model_name ConvNet --num_clients 80 --frac 0.4 \
      --epochs 1 --batch_size 32 --lr 0.001 --optimizer adam --block_dim BC --alpha 0.01 --use_quantization \
      --quantization_bits 8 --moving_average --ma_start 1 --moving_weight 0.9 --c_rounds 2 --device cuda \
      --cohort "$cohort" --compile "$compile" --out "$out/$name" --quiet 2>&1 | tee "$out/$name.log" || { failed=1; continue; }
    "$python" -c 'import json,sys; [print(sys.argv[1], r["round"], r["test_accuracy"], round(r["round_time_s"], 2), {k: round(v, 2) for k, v in r["phase_s"].items()}) for r in map(json.loads, open(sys.argv[2]))]' \
      "$name" "$out/$name/metrics.jsonl"
  done
fi
exit "$failed"
