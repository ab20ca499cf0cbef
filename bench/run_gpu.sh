#!/usr/bin/env bash
# Build the synthetic 15B-shaped models and benchmark them (bench/engine_bench.py, then
# bench/decode_profile.py): one GPU per branch when there are two. Results go to $OUT (default
# /tmp/bench-out). Usage: bash bench/run_gpu.sh [bits ...] (default: 4.25 6.5). On one H200 a branch
# took 8.2 minutes with five variants; with the sixth (ours-graph-sync) expect about 9, so pass one
# branch per call where a call's time is capped.
set -u
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
base=/dev/shm
[ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 40 ] || base=/tmp
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
gpus=$(nvidia-smi -L | wc -l)
branches=("$@")
[ ${#branches[@]} -eq 0 ] && branches=(4.25 6.5)

branch() {  # bits, gpu
  local name=${1/./_}
  CUDA_VISIBLE_DEVICES=$2 python bench/synthetic.py --bits "$1" --out "$base/sc2-$name" \
    > "$out/log-$name.txt" 2>&1
  CUDA_VISIBLE_DEVICES=$2 python bench/engine_bench.py --model "$base/sc2-$name" \
    --out "$out/bench-$name.json" >> "$out/log-$name.txt" 2>&1
  CUDA_VISIBLE_DEVICES=$2 python bench/decode_profile.py --model "$base/sc2-$name" \
    --out "$out/decode-profile-$name.json" >> "$out/log-$name.txt" 2>&1
}

for i in "${!branches[@]}"; do
  gpu=$(( i % gpus ))
  branch "${branches[$i]}" "$gpu" &
  if [ "$gpu" = $(( gpus - 1 )) ]; then wait; fi  # every GPU busy: let this round finish
done
wait
tail -n 3 "$out"/log-*.txt
