#!/usr/bin/env bash
# The GPU session of the training-step, streaming-speech and soft-DTW benchmarks, in one call.
#
#   scripts/gpu_session_train.sh fetch   # here, with the package registry: wheels into .whl/ (< 64 MiB)
#   scripts/gpu_session_train.sh         # on the GPU machine (.whl/ carried): install what is
#                                        # missing, run the three benchmarks into $OUT (8 min at most)
#   DRY_RUN=1 OUT=docs/dryrun scripts/gpu_session_train.sh   # the same paths on the CPU, nano preset,
#                                        # short lengths (soft-DTW left out: its GPU kernels need CUDA)
#
# The wheels, what they are for and how they are installed: scripts/gpu_wheels.sh (shared with
# scripts/gpu_session_lmme.sh, whose fetch gets the same set).
# The device call: run(command="bash scripts/gpu_session_train.sh", carry=[".whl"], timeout_s=540).
# Benchmark figures go to $OUT/*.json, logs to $OUT/*.log, exit codes and wall times to
# $OUT/session.txt. Each benchmark has its own time limit (seconds, TRAIN_S / SPEECH_S /
# SOFTDTW_S), so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu_wheels.sh
source scripts/gpu_wheels.sh

run_bench() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$((SECONDS - start)) limit_s=$limit: $*" | tee -a "$OUT/session.txt"
  tail -n 25 "$OUT/$name.log"
}

main() {
  OUT=${OUT:?set OUT to the folder the results go to}
  SUFFIX=$([ -n "${DRY_RUN:-}" ] && echo nano_dryrun || echo cuda)
  mkdir -p "$OUT"
  local start=$SECONDS
  install_missing 2>&1 | tee "$OUT/install.log"
  use_site
  {
    show_gpu
    $PYTHON -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "peft", peft.__version__)'
    echo "install_s=$((SECONDS - start))"
  } 2>&1 | tee "$OUT/session.txt"
  if [ -n "${DRY_RUN:-}" ]; then  # the same code paths, small enough for a shared CPU
    local model=(--preset nano --device cpu --dtype bf16) lengths=(600 1200) long=(1500) repeats=2
    local speech=(--chunks 5 --max-new-tokens 12 --repeats 1)
  else
    local model=(--preset base --device cuda --dtype bf16) lengths=(8192 16384 32768) long=(25000) repeats=3
    local speech=()
  fi
  run_bench bench_train_step "${TRAIN_S:-270}" $PYTHON scripts/bench_train_step.py "${model[@]}" \
    --lengths "${lengths[@]}" --long-speech-lengths "${long[@]}" --warmup 1 --repeats "$repeats" \
    --json "$OUT/bench_train_step_${SUFFIX}.json"
  run_bench bench_speech_latency "${SPEECH_S:-80}" $PYTHON scripts/bench_speech_latency.py "${model[@]}" \
    "${speech[@]}" --out "$OUT/bench_speech_latency_${SUFFIX}.json"
  if [ -z "${DRY_RUN:-}" ]; then
    run_bench bench_softdtw "${SOFTDTW_S:-110}" $PYTHON scripts/bench_softdtw.py --device cuda \
      --out "$OUT/bench_softdtw_cuda.json"
  fi
  echo "session_s=$((SECONDS - start))" | tee -a "$OUT/session.txt"
}

case "${1:-run}" in
  fetch) fetch ;;
  run) main ;;
  *) echo "usage: $0 [fetch|run]" >&2; exit 2 ;;
esac
