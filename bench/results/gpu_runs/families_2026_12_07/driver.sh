#!/usr/bin/env bash
# session GPU driver: bounded runs, logs to $OUT
set -uo pipefail
. /tmp/kit/env.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
git rev-parse --short HEAD > $OUT/commit.txt 2>/dev/null || true
bounded() {  # bounded SECS NAME cmd...: run in its own process group, kill the group at SECS
  local secs=$1 name=$2; shift 2
  local t0=$(date +%s)
  setsid bash -c "$*" > $OUT/$name.out 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -ge $secs ]; then echo "[$name] cut at ${secs}s" | tee -a $OUT/$name.out; kill -TERM -- -$pid; sleep 5; kill -KILL -- -$pid 2>/dev/null; break; fi
    sleep 2
  done
  wait $pid 2>/dev/null; echo "[$name] rc=$? after $(( $(date +%s) - t0 ))s" | tee -a $OUT/times.txt
  tail -n 4 $OUT/$name.out
  nvidia-smi --query-gpu=memory.used --format=csv,noheader >> $OUT/times.txt
}
for step in "$@"; do
  case "$step" in
  fla) python3 -c "import fla" 2>/dev/null || bash .device-kit/fla/install.sh ;;
  gemma) bounded ${T:-420} gemma "SIZES=maze2d-qwen3vl:google/gemma-4-e2b-it LORA=64 PROMPTS=${PROMPTS:-4} bash bench/device_runs.sh families sizes" ;;
  q35s) bounded ${T:-300} q35s "SIZES=maze2d-qwen3vl:Qwen/Qwen3.5-0.8B PROMPTS=${PROMPTS:-4} bash bench/device_runs.sh families sizes" ;;
  q35m) bounded ${T:-420} q35m "SIZES=maze2d-qwen3vl:Qwen/Qwen3.5-4B LORA=64 PROMPTS=${PROMPTS:-4} bash bench/device_runs.sh families sizes" ;;
  mfu) bounded ${T:-500} mfu "SIZE=qwen3_vl_2b bash bench/device_runs.sh mfu a" ;;
  tests) bounded ${T:-540} tests "python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k '${K}' 2>&1 | tail -n 40" ;;
  clean) rm -rf /tmp/shape /tmp/qwen3_vl_2b ;;
  esac
done
df -h /tmp | tail -1 >> $OUT/times.txt
