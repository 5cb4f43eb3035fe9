#!/usr/bin/env bash
# Advance the paper's grid on a CUDA machine for at most SECONDS, then pack the result files.
#
# Usage: bash benchmarks/reproduce_on_gpu.sh DATA_DIR RUNS_DIR SECONDS DEST_DIR [CONFIGS] [PARALLEL] [SEEDS] [ALPHAS]
#
# CONFIGS: comma-separated names of reproduce_paper.py (default q8-avg,q8-noavg,fp32-noavg); SEEDS:
# comma-separated (default 0; seed s > 0 runs go in RUNS_DIR/<config>-s<s>/); ALPHAS: comma-separated
# Dirichlet alphas (default 0.01; other alphas' runs go in RUNS_DIR/<config>-a<alpha>[-s<s>]/).
#
# The runs and their checkpoints stay in RUNS_DIR, so the same command continues them (here or,
# with reproduce_paper.py, on any machine that has RUNS_DIR). At the deadline every run finishes
# its round, checkpoints and stops. DEST_DIR receives results.tar.gz (metrics, summaries, table,
# curves; no checkpoints), grid.log, progress.log and cuda_tests.txt (the CUDA test cases).
# If a run fails, the grid is continued with the clients trained one at a time (--cohort off), then
# also without torch.compile (--compile off). DEVICE (default cuda)
# names the device, e.g. DEVICE=cpu to try the script on a small data folder; PYTHON the
# interpreter (default python3); THREADS the torch CPU threads of each run (default 1: a GPU run's
# CPU work is the codec, small tensors one at a time, which a pool of threads only slows; with 16
# threads and the CUDA tests beside it, one H200 run spent 6.5 s a round there, with one thread
# 0.3-0.6 s, as on one core of the CPU machine; results/gpu-2026-12-04).
set -uo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 DATA_DIR RUNS_DIR SECONDS DEST_DIR [CONFIGS] [PARALLEL] [SEEDS] [ALPHAS]" >&2
  exit 2
fi
if [ ! -d "$1/FashionMNIST/raw" ]; then
  echo "$0: DATA_DIR $1 has no FashionMNIST/raw (the folder of the IDX files)" >&2
  exit 2
fi
if ! [[ $3 =~ ^[0-9]+$ ]] || [ "$3" -le 60 ]; then
  echo "$0: SECONDS $3: expected a whole number of seconds > 60 (the grid stops a minute before it)" >&2
  exit 2
fi
# the paths as the caller meant them, before the cd below
data=$(realpath -m "$1") runs=$(realpath -m "$2") seconds=$3 dest=$(realpath -m "$4")
cd "$(dirname "$0")/.."
configs=${5:-q8-avg,q8-noavg,fp32-noavg} parallel=${6:-3} seeds=${7:-0} alphas=${8:-0.01}
device=${DEVICE:-cuda} python=${PYTHON:-python3} threads=${THREADS:-1}
deadline=$((SECONDS + seconds))
mkdir -p "$dest" "$runs"
if [ "$device" = cuda ]; then
  "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
fi
"$python" -m pytest -q -m cuda -p no:cacheprovider tests/quant/test_cuda.py >"$dest/cuda_tests.txt" 2>&1 &
tests=$!
(
  while sleep 30; do
    for f in "$runs"/*/metrics.jsonl; do
      [ -f "$f" ] && "$python" -c 'import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); print(sys.argv[2], sys.argv[1], "round", r["round"], "acc", r["test_accuracy"], "round_s", round(r["round_time_s"], 2))' "$f" "$(date +%T)"
    done
  done
) >>"$dest/progress.log" 2>&1 &
monitor=$!
status=1
for variant in auto:auto off:auto off:off; do
  cohort=${variant%%:*} compile=${variant#*:}
  [ $((deadline - SECONDS)) -gt 60 ] || break
  timeout --foreground -s INT -k 60 $((deadline - SECONDS)) "$python" benchmarks/reproduce_paper.py \
    --data_path "$data" --out "$runs" --configs "$configs" --seeds "$seeds" --alpha "$alphas" --device "$device" --parallel "$parallel" \
    --threads "$threads" --checkpoint_every 10 --cohort "$cohort" --compile "$compile" --archive "$dest/results.tar.gz" 2>&1 | tee -a "$dest/grid.log"
  status=${PIPESTATUS[0]}
  if [ "$status" -eq 0 ] || [ "$status" -eq 124 ]; then break; fi  # done, or the deadline (runs stopped cleanly)
done
kill "$monitor" 2>/dev/null
wait "$tests"
tail -3 "$dest/cuda_tests.txt"
exit "$status"
