#!/usr/bin/env bash
# The `serve` extra (Starlette, uvicorn, FastAPI for `transformers serve`, the `openai` client) for the GPU machine,
# which has torch, triton, transformers and httpx but none of these and reaches no package index. Chapter 11 and
# `python -m nanovllm.bench --workload serve` need them there.
#
# Here, in the project's root:
#   bash tests/gpu/serve_wheels.sh download        # -> .gpu/serve (about 6 MB; .gpu/ is ignored by git)
# On the GPU machine, in the call that carries .gpu/a (the GPU notes' call 1; together 63 MiB of 64):
#   bash .gpu/bin/stash.sh && bash tests/gpu/serve_wheels.sh stash     # carry [".gpu/a", ".gpu/bin", ".gpu/serve"]
# then in any later call on that warm machine (book_lanes.sh and open_issues.sh do it themselves):
#   bash tests/gpu/serve_wheels.sh install && export PYTHONPATH=/tmp/serve-site
set -euo pipefail
STASH=/tmp/serve-stash SITE=/tmp/serve-site
case ${1:-} in
  download)
    cd "$(git rev-parse --show-toplevel)" && rm -rf .gpu/serve && mkdir -p .gpu/serve
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu/serve fastapi uvicorn starlette openai 2> >(grep -v "is ignored: it is neither" >&2 || true)
    rm -f .gpu/serve/typing_extensions-[0-9]*.whl .gpu/serve/idna-[0-9]*.whl  # the machine has these
    echo "$(ls .gpu/serve | wc -l) wheels, $(du -sh .gpu/serve | cut -f1) in .gpu/serve" ;;
  stash) mkdir -p "$STASH" && cp .gpu/serve/*.whl "$STASH"/ && echo "stashed $(ls "$STASH" | wc -l) serve wheels" ;;
  install)
    [ -d "$SITE/uvicorn" ] && exit 0
    ls "$STASH"/*.whl > /dev/null 2>&1 || { echo "no wheels in $STASH: stash them first, on this machine" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STASH"/*.whl
    echo "installed $(ls "$STASH" | wc -l) serve wheels in $SITE" ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; [ -z "${1:-}" ] || exit 2 ;;
esac
