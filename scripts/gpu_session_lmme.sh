#!/usr/bin/env bash
# LMME at Lyra-Base size on one GPU, next to the paper's Table 4a (scripts/bench_lmme.py).
#
# Two modes, both run from anywhere inside the checkout:
#
#   PYTHON=.venv/bin/python bash scripts/gpu_session_lmme.sh fetch
#       Here, with network access to the package registry: downloads (no dependencies) the
#       wheels that the GPU machine lacks or has at other versions into .whl/ (git-ignored),
#       the same set for both GPU sessions (scripts/gpu_wheels.sh), and checks that they and
#       the checkout travel within 64 MiB. The GPU image has torch 2.11, transformers 5.17,
#       huggingface-hub 1.33, tokenizers 0.23.2, PyYAML, Pillow, but not our transformers 5.24
#       (its layers take `cache=`) nor pydantic (lyra.config); the benchmark imports neither
#       deepspeed, openai-whisper nor librosa (lyra.model.backbone, not lyra.model.lyra), so
#       those stay behind.
#
#   bash scripts/gpu_session_lmme.sh
#       On the GPU machine: installs into /tmp/site (--no-deps) the carried wheels of what the
#       machine does not satisfy, then runs the benchmark with Lyra-Base in bf16 for 2^11 ..
#       2^17 context tokens, 2 repeats, 64 decode tokens, within a 330 s time budget (cells
#       predicted not to fit are recorded as skipped), writing into $OUT: bench_lmme_gpu.json / .png / _profile.txt, the log and
#       nvidia-smi's view of the card. BUDGET (seconds) and REPEATS override the defaults.
#
# The device call (one: at most 8 minutes of command, plus the machine's start, of the 15 lent):
#
#   run(command="bash scripts/gpu_session_lmme.sh", kind="nvidia-h200", carry=[".whl"], timeout_s=480)
#
# then copy bench_lmme_gpu.json / .png / _profile.txt from the returned files into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."  # the checkout's root (the device machine's copy has no .git)

# shellcheck source=scripts/gpu_wheels.sh
source scripts/gpu_wheels.sh

bench() {
    : "${OUT:?OUT must name the folder for the results (the device machine sets it)}"
    install_missing
    use_site
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # long prompts: less fragmentation before an OOM
    show_gpu | tee "$OUT/nvidia_smi.txt"
    local started=$SECONDS status=0
    "$PYTHON" scripts/bench_lmme.py --preset base --dtype bf16 --device cuda \
        --lengths 2048 4096 8192 16384 32768 65536 131072 --repeats "${REPEATS:-2}" --decode-tokens 64 \
        --check-tokens 2048 --time-budget "${BUDGET:-330}" --out "$OUT/bench_lmme_gpu" 2>&1 |
        tee "$OUT/bench_lmme_gpu.log" || status=$?
    echo "bench wall time: $((SECONDS - started)) s, exit $status" | tee -a "$OUT/bench_lmme_gpu.log"
    return "$status"
}

case "${1:-bench}" in
    fetch) fetch ;;
    bench) bench ;;
    *) echo "usage: $0 [fetch|bench]" >&2; exit 2 ;;
esac
