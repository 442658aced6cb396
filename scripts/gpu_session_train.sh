#!/usr/bin/env bash
# The GPU session of the training-step, streaming-speech and soft-DTW benchmarks, in one call.
#
#   scripts/gpu_session_train.sh fetch   # here, with the package registry: wheels into .whl/ (< 64 MiB)
#   scripts/gpu_session_train.sh         # on the GPU machine (.whl/ carried): install what is
#                                        # missing, run the three benchmarks into $OUT (8 min at most)
#   DRY_RUN=1 OUT=docs/dryrun scripts/gpu_session_train.sh   # the same paths on the CPU, nano preset,
#                                        # short lengths (soft-DTW left out: its GPU kernels need CUDA)
#
# The GPU machine has torch, transformers 5.17, peft and accelerate, and no registry. Lyra needs
# transformers 5.24 (its decoder layers take `cache=`, 5.17's `past_key_values=`), which needs
# huggingface-hub >= 1.31 (2.x imports httpx2); pydantic checks Lyra's configs; pysdtw is the
# carried GPU soft-DTW. Every wheel is installed with --no-deps and only where what is installed
# does not satisfy Lyra: the machine's own torch and numpy stay. pydantic-core is the one
# compiled wheel: fetch gets it for Pythons 3.11 to 3.13 (transformers 5.24 needs 3.11) (TARGET_PYS to change).
# The device call: run(command="bash scripts/gpu_session_train.sh", carry=[".whl"], timeout_s=540).
# Benchmark figures go to $OUT/*.json, logs to $OUT/*.log, exit codes and wall times to
# $OUT/session.txt. Each benchmark has its own time limit (seconds, TRAIN_S / SPEECH_S /
# SOFTDTW_S), so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where missing wheels go: the machine's own environment stays as it is
MAX_MIB=64
# distribution | what Lyra accepts | wheels to install when it is not met
REQUIREMENTS='
transformers|==5.24.0|transformers==5.24.0
huggingface-hub|>=1.31,<3|huggingface-hub==2.4.0
httpx2|>=2|httpx2==2.17.0
httpcore2|>=2|httpcore2==2.17.0
truststore|>=0.10|truststore==0.10.5
peft|==0.21.2|peft==0.21.2
accelerate|==1.15.0|accelerate==1.15.0
regex|>=2025.10.22|regex==2026.12.2
typing-extensions|>=4.16.0|typing-extensions==4.16.0
pydantic|>=2.7|pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
pysdtw|>=0.0.5|pysdtw==0.0.5
'

fetch() {
  mkdir -p "$WHEELS"
  local target
  for target in ${TARGET_PYS:-3.11 3.12 3.13}; do  # the pure wheels are the same file for each
    # shellcheck disable=SC2046
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version "$target" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$WHEELS" $(echo "$REQUIREMENTS" | cut -d'|' -f3) || exit 1
  done
  local mib
  mib=$(du -sm "$WHEELS" | cut -f1)
  echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $mib MiB"
  if [ "$mib" -ge "$MAX_MIB" ]; then
    echo "error: $WHEELS holds $mib MiB, over the $MAX_MIB MiB that travel to the GPU machine" >&2
    exit 1
  fi
}

install_missing() {
  if [ ! -d "$WHEELS" ]; then
    echo "error: no $WHEELS/ here: run '$0 fetch' on a machine with the registry and carry $WHEELS" >&2
    return 1
  fi
  echo "$REQUIREMENTS" | while IFS='|' read -r name accepted pins; do
    [ -z "$name" ] && continue
    if $PYTHON - "$name" "$accepted" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.specifiers import SpecifierSet
name, accepted = sys.argv[1:]
try:
    found = version(name)
except PackageNotFoundError:
    found = None
print(f"{name}: {found or 'missing'} (Lyra takes {accepted})")
sys.exit(0 if found is not None and SpecifierSet(accepted).contains(found, prereleases=True) else 1)
PY
    then continue; fi
    # shellcheck disable=SC2086
    $PYTHON -m pip install -q --no-deps --no-index --no-compile --find-links "$WHEELS" --upgrade \
      --target "$SITE" $pins \
      || echo "warning: could not install $pins; the benchmarks that need $name will say so"
  done
}

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
  # what was installed above, then this checkout's lyra (not an installed one)
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
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
