#!/usr/bin/env bash
# The GPU tests (`-m "gpu and not soak"`) on one GPU in about half the time of one pytest process:
# the engine tests as two processes at once, then the web tests alone (they measure the device's
# free VRAM, which other processes would move). Logs and a summary go to $OUT (default
# /tmp/gpu-tests). Usage: bash tests/run_gpu.sh [pytest options ...]; exits non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-tests}
mkdir -p "$out"
summary=$out/summary.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$summary" \
  || echo "no nvidia-smi: no NVIDIA GPU here" > "$summary"
# The two halves took 225 and 232 s on an H100; a new test file joins the second.
first_half="test_exl2_layout_gpu test_exl2_matmul_gpu test_decode_matmul_gpu test_engine_gpu test_long_context_gpu"
first=() rest=()
for file in tests/engine/test_*.py; do
  name=$(basename "$file" .py)
  if [[ " $first_half " == *" $name "* ]]; then first+=("$file"); else rest+=("$file"); fi
done

failed=0
group() {  # name, files...
  local name=$1 started=$SECONDS status=0
  shift
  python -m pytest -m "gpu and not soak" -rfEs --durations=8 "$@" > "$out/$name.log" 2>&1 \
    || status=$?
  echo "$name: $(tail -n 1 "$out/$name.log") ($(( SECONDS - started )) s, exit $status)" >> "$summary"
  return "$status"
}
group engine-first "${first[@]}" "${@}" & first_pid=$!
group engine-rest "${rest[@]}" "${@}" & rest_pid=$!
wait "$first_pid" || failed=1
wait "$rest_pid" || failed=1
group web tests/web "${@}" || failed=1
cat "$summary"
exit "$failed"
