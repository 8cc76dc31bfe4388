#!/usr/bin/env bash
# flash-attn 4 for the GPU machine, which has torch, triton and the nvidia-* libraries but reaches no package
# index, and where one device call carries at most 64 MiB (the checkout included). The wheels flash-attn-4 needs
# beyond what is there are fetched here and packed into folders of one call each (a wheel over 60 MB travels in
# parts, joined on the machine); then one device call per folder, in order, on the same warm machine.
#
# Here, in the project's root:
#   bash tests/gpu/fa4_wheels.sh download           # -> .fa4/call1, .fa4/call2, ... (ignored by git); prints the calls
# On the GPU machine (one device call each, carrying that folder):
#   bash tests/gpu/fa4_wheels.sh stash .fa4/callK      # every call but the last: keep its files in the stash
#   bash tests/gpu/fa4_wheels.sh install .fa4/callN    # the last: join the parts, check them, install (once)
#   bash tests/gpu/fa4_wheels.sh run CMD ...           # CMD with the checkout and the install on the path, e.g.
#   bash tests/gpu/fa4_wheels.sh run python3 tests/gpu/fa4_check.py --only kernels,graphs,decode
# (install and run can share the last call: `bash tests/gpu/fa4_wheels.sh install .fa4/callN && bash ... run ...`).
#
# FA4_CUDA=cu13 fetches CUDA 13's CuTe DSL libraries instead of CUDA 12's (match the machine's torch.version.cuda,
# which install prints). FA4_SITE (default $TMPDIR/fa4-site) is where it installs, FA4_STASH where parts wait.
set -euo pipefail
tmp=${TMPDIR:-/tmp}
SITE=${FA4_SITE:-$tmp/fa4-site}
STASH=${FA4_STASH:-$tmp/fa4-stash}
LIMIT=67108864      # what one device call carries, in bytes (64 MiB)
MARGIN=2097152      # kept free in each call
SPLIT_OVER=60000000 # wheels larger than this travel in parts
PART=40000000       # of this size
# flash-attn-4 4.0.0b40 (the version nanovllm/attention/flash_attn4.py was written against) and the versions pip
# resolved with it: its dependencies beyond torch, triton, typing_extensions and the nvidia-* libraries. Bump
# them together.
cuda=${FA4_CUDA:-cu12}
case $cuda in
  cu12) libs=(nvidia-cutlass-dsl-libs-cu12==4.8.1 cuda-bindings==12.9.4) ;;
  cu13) libs=(nvidia-cutlass-dsl-libs-cu13==4.8.1 "cuda-bindings>=13,<14") ;;
  *) echo "FA4_CUDA must be cu12 or cu13, got $cuda" >&2; exit 2 ;;
esac
PINS=(flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 "${libs[@]}" apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
      quack-kernels==0.6.5 cuda-pathfinder==1.9.1 einops)

size() { stat -c %s "$1"; }

download() {
  root=$(git rev-parse --show-toplevel); cd "$root"
  rm -rf .fa4 && mkdir -p .fa4/whl .fa4/items
  git check-ignore -q .fa4/whl || { echo ".fa4/ must be ignored by git (.gitignore): calls carry it by name" >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .fa4/whl "${PINS[@]}"
  : > .fa4/manifest  # one line per wheel: sha256, file name, number of parts (0: whole)
  for w in .fa4/whl/*.whl; do
    name=$(basename "$w")
    if [ "$(size "$w")" -gt $SPLIT_OVER ]; then
      split -b $PART "$w" ".fa4/items/$name.part."
      parts=$(ls ".fa4/items/$name.part."* | wc -l)
    else
      cp "$w" .fa4/items/ && parts=0
    fi
    echo "$(sha256sum "$w" | cut -d' ' -f1) $name $parts" >> .fa4/manifest
  done
  # what every call carries besides its folder: the checkout (tracked files and untracked ones git does not ignore)
  checkout=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
  room=$(( LIMIT - MARGIN - checkout ))
  # first fit, largest first: each file goes into the first call with room for it
  declare -a used=()
  while read -r bytes file; do
    k=0
    while [ $k -lt ${#used[@]} ] && [ $(( used[k] + bytes )) -gt $room ]; do k=$(( k + 1 )); done
    [ "$bytes" -le $room ] || { echo "$file ($bytes bytes) does not fit one call ($room bytes free)" >&2; exit 1; }
    [ $k -lt ${#used[@]} ] || used+=(0)
    used[k]=$(( used[k] + bytes ))
    mkdir -p .fa4/call$(( k + 1 )) && mv "$file" .fa4/call$(( k + 1 ))/
  done < <(for f in .fa4/items/*; do echo "$(size "$f") $f"; done | sort -rn)
  n=${#used[@]}
  cp .fa4/manifest .fa4/call$n/  # the last call joins and installs
  rm -rf .fa4/items
  echo "checkout: $(( checkout / 1048576 )) MiB, carried by every call; $n calls, in this order, on one warm machine:"
  for k in $(seq "$n"); do
    what=stash; [ "$k" = "$n" ] && what=install
    echo "  call $k: bash tests/gpu/fa4_wheels.sh $what .fa4/call$k    carrying .fa4/call$k" \
         "($(( (used[k - 1] + checkout) / 1048576 )) MiB of 64):"
    ls .fa4/call$k | { grep -v '^manifest$' || true; } | sed 's/^/      /'
  done
  echo "then: bash tests/gpu/fa4_wheels.sh run python3 tests/gpu/fa4_check.py --only ... (same machine)"
}

stash() {
  mkdir -p "$STASH" && cp "$1"/* "$STASH"/
  echo "stashed: $(ls "$STASH" | tr '\n' ' ')"
}

install() {
  [ -f "$1/manifest" ] || { echo "$1 has no manifest: it is not the last call's folder (stash it instead)" >&2; exit 2; }
  if [ -f "$SITE/.fa4-manifest" ] && cmp -s "$1/manifest" "$SITE/.fa4-manifest"; then
    echo "already installed in $SITE"
  else
    stash "$1" >/dev/null
    wheels=()
    while read -r sha name parts; do
      if [ "$parts" -gt 0 ]; then
        have=$(ls "$STASH/$name.part."* 2>/dev/null | wc -l)
        [ "$have" -eq "$parts" ] || { echo "$name: $have of $parts parts in $STASH: make the earlier calls" \
                                           "(stash) first, on this same warm machine" >&2; exit 3; }
        cat "$STASH/$name.part."* > "$STASH/$name"  # the glob sorts the parts: .aa, .ab, ...
      fi
      [ -f "$STASH/$name" ] || { echo "$name is not in $STASH: make the earlier calls (stash) first" >&2; exit 3; }
      [ "$(sha256sum "$STASH/$name" | cut -d' ' -f1)" = "$sha" ] || { echo "$name: checksum differs" >&2; exit 3; }
      wheels+=("$STASH/$name")
    done < "$1/manifest"
    rm -rf "$SITE"
    python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
    cp "$1/manifest" "$SITE/.fa4-manifest"
    echo "installed ${#wheels[@]} wheels in $SITE"
  fi
  run python3 -c "import torch, flash_attn.cute, cutlass; print('flash_attn.cute imports; torch', torch.__version__,
    'CUDA', torch.version.cuda, '; cutlass-dsl', getattr(cutlass, '__version__', '?'))"
}

run() {
  # the checkout, then the install; nvidia_cutlass_dsl/dsl_packages is what the cutlass wheel's .pth file adds
  # (a --target folder on PYTHONPATH is not a site directory: its .pth files are not read)
  root=$(cd "$(dirname "$0")/../.." && pwd)
  export PYTHONPATH=$root:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  "$@"
}

what=${1:-}
case $what in
  download) download ;;
  stash) [ $# -eq 2 ] || { echo "usage: $0 stash FOLDER" >&2; exit 2; }; stash "$2" ;;
  install) [ $# -eq 2 ] || { echo "usage: $0 install FOLDER" >&2; exit 2; }; install "$2" ;;
  run) shift; [ $# -gt 0 ] || { echo "usage: $0 run CMD ..." >&2; exit 2; }; run "$@" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$what" ] || exit 2 ;;
esac
