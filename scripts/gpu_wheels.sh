# The wheels Lyra needs on the GPU machine, sourced by scripts/gpu_session_lmme.sh and
# scripts/gpu_session_train.sh (run from the checkout's root).
#
# The GPU machine has torch, transformers 5.17, huggingface-hub 1.33, peft and accelerate, and no
# registry. Lyra needs transformers 5.24 (its decoder layers take `cache=`, 5.17's
# `past_key_values=`), which needs huggingface-hub >= 1.31 (2.x imports httpx2); pydantic checks
# Lyra's configs; pysdtw is the carried GPU soft-DTW. Every wheel is installed with --no-deps and
# only where what is installed does not satisfy Lyra: the machine's own torch and numpy stay.
# pydantic-core and regex are the compiled wheels: fetch gets them for Pythons 3.11 to 3.13
# (transformers 5.24 needs 3.11; TARGET_PYS to change), and the install picks the running one's.
#
#   fetch            here, with the package registry: every wheel below into .whl/ (git-ignored),
#                    checking that they and the checkout travel within 64 MiB
#   install_missing  on the GPU machine (.whl/ carried): the wheels of each requirement that the
#                    machine does not satisfy, into $SITE
#   use_site         $SITE, then this checkout's lyra (not an installed one), on PYTHONPATH
#   show_gpu         the card's name, memory and driver, as nvidia-smi reports them

WHEELS=.whl
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}  # where missing wheels go: the machine's own environment stays as it is
MAX_MIB=64  # what a device call carries: the checkout and .whl/ together
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
  local wheels tree
  wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
  tree=$({ git ls-files -z; git ls-files -z -o --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $((wheels / 1024)) KiB + checkout $((tree / 1024)) KiB travel" \
    "(limit $MAX_MIB MiB)"
  if [ $((wheels + tree)) -ge $((MAX_MIB * 1024 * 1024)) ]; then
    echo "error: over $MAX_MIB MiB: the device call would refuse the tree" >&2
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

use_site() {
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
}

show_gpu() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
}
