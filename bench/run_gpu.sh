#!/usr/bin/env bash
# Build the synthetic 4.25 and 6.5 bpw models and benchmark them: one GPU per branch when there are
# two. Results go to $OUT (default /tmp/bench-out). Usage: bash bench/run_gpu.sh
set -u
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
base=/dev/shm
[ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 40 ] || base=/tmp
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
gpus=$(nvidia-smi -L | wc -l)
second=$(( gpus > 1 ? 1 : 0 ))

branch() {  # bits, gpu, name, extra bench flags
  CUDA_VISIBLE_DEVICES=$2 python bench/synthetic.py --bits "$1" --out "$base/sc2-$3" \
    > "$out/log-$3.txt" 2>&1
  CUDA_VISIBLE_DEVICES=$2 python bench/engine_bench.py --model "$base/sc2-$3" \
    --out "$out/bench-$3.json" ${4:-} >> "$out/log-$3.txt" 2>&1
}

branch 4.25 0 4_25 &
if [ "$second" = 1 ]; then
  CUDA_VISIBLE_DEVICES=1 python -m pytest -m gpu tests/test_engine_gpu.py -q -p no:cacheprovider \
    -k "paged or greedy or batched" > "$out/tests.txt" 2>&1
  branch 6.5 1 6_5
else
  wait
  branch 6.5 0 6_5
fi
wait
tail -n 3 "$out"/log-*.txt "$out/tests.txt" 2>/dev/null
