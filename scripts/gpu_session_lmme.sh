#!/usr/bin/env bash
# LMME at Lyra-Base size on one GPU, next to the paper's Table 4a (scripts/bench_lmme.py).
#
# Two modes, both run from anywhere inside the checkout:
#
#   PYTHON=.venv/bin/python bash scripts/gpu_session_lmme.sh fetch
#       Here, with network access to the package registry: downloads (no dependencies) the
#       wheels that the GPU machine lacks or has at other versions into .whl/ (git-ignored
#       through .git/info/exclude), at the versions installed in $PYTHON's environment, and
#       checks that they and the checkout travel within 64 MiB. The GPU image has torch 2.11,
#       transformers 5.17, huggingface-hub 1.33, tokenizers 0.23.2, PyYAML, Pillow, but not
#       our transformers 5.24 (its layers take `cache=`) nor pydantic (lyra.config); the benchmark
#       imports neither deepspeed, openai-whisper nor librosa (lyra.model.backbone, not
#       lyra.model.lyra), so those stay behind.
#
#   bash scripts/gpu_session_lmme.sh
#       On the GPU machine: installs .whl/*.whl (--no-deps) into /tmp/site, then runs the
#       benchmark with Lyra-Base in bf16 for 2^11 .. 2^17 context tokens, 2 repeats, 64 decode
#       tokens, within a 330 s time budget (cells predicted not to fit are recorded as
#       skipped), writing into $OUT: bench_lmme_gpu.json / .png / _profile.txt, the log and
#       nvidia-smi's view of the card. BUDGET (seconds) and REPEATS override the defaults.
#
# The device call (one: at most 8 minutes of command, plus the machine's start, of the 15 lent):
#
#   run(command="bash scripts/gpu_session_lmme.sh", kind="nvidia-h200", carry=[".whl"], timeout_s=480)
#
# then copy bench_lmme_gpu.json / .png / _profile.txt from the returned files into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."  # the checkout's root (the device machine's copy has no .git)

WHEELS=".whl"
LIMIT_MIB=64
PACKAGES=(transformers pydantic pydantic-core annotated-types typing-inspection typing-extensions regex)

fetch() {
    local python="${PYTHON:-python3}" specs=() name version
    for name in "${PACKAGES[@]}"; do
        version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
            { echo "error: $name is not installed in $python's environment; set PYTHON to the project venv" >&2; exit 1; }
        specs+=("$name==$version")
    done
    mkdir -p "$WHEELS"
    grep -qx "/$WHEELS/" "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null ||
        echo "/$WHEELS/" >>"$(git rev-parse --git-common-dir)/info/exclude"
    rm -f "$WHEELS"/*.whl  # one version of each: two would stop the install there
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${specs[@]}"
    local wheels tree
    wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
    tree=$({ git ls-files -z; git ls-files -z -o --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    ls -l "$WHEELS"
    echo "wheels $((wheels / 1024)) KiB + checkout $((tree / 1024)) KiB travel (limit $LIMIT_MIB MiB)"
    if [ $((wheels + tree)) -ge $((LIMIT_MIB * 1024 * 1024)) ]; then
        echo "error: over $LIMIT_MIB MiB: the device call would refuse the tree" >&2
        exit 1
    fi
}

bench() {
    : "${OUT:?OUT must name the folder for the results (the device machine sets it)}"
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $WHEELS/; run '$0 fetch' here first" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # long prompts: less fragmentation before an OOM
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt" || true
    local started=$SECONDS status=0
    python3 scripts/bench_lmme.py --preset base --dtype bf16 --device cuda \
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
