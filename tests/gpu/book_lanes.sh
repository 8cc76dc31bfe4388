#!/usr/bin/env bash
# The book on the GPU machine in parallel lanes, within one device call (after the GPU notes' `prepare` and
# their first call, stash.sh: the model and the notebook tools are in .gpu/ and in the folder stash.sh filled,
# passed as STASH).  From the repository root:
#
#   STASH=<that folder> DEADLINE=420 bash tests/gpu/book_lanes.sh "8:00 01 02" ":03 04" "8:12 13" ":12 13"
#
# Each argument is one lane, "GIB:CHAPTERS": the chapters run one after another through nbval (book.sh), with
# the GPU's memory capped at GIB GiB (`--gib`; empty: the whole card); the lanes run at the same time, so the
# times they report are inflated.  Wheels that `prepare` left in the first call's part (.gpu/a, now in
# STASH) join the second's before the install.  Before the lanes start, one engine converts the embedded
# model (once per machine, so the lanes do not all do it at once).  Logs: $OUT/laneN/chNN.log (OUT defaults to
# .gpu/lanes in the checkout); printed: a line
# per chapter, then the failing cells' lines of every log (what a device call's reply shows).
#
# Memory: the lanes share one card. Chapter 10's seed benchmark and chapter 12's benchmark cell size their engines
# from the whole card (a share of its memory, as `gpu_memory_utilization` does), so an uncapped lane holding either
# starves the lanes beside it: on 2026-12-07 five lanes (00-06 / 07 08 09 13 / 10 / 12 / 10 12 at 8 GiB) ran out of
# memory in 01, 07 and 08. Give uncapped 10 and 12 a call of their own, or run them capped ("8:10 12") beside the
# rest.
set -u
root=$(pwd)
B=$root/.gpu/bin
[ -x "$B/book.sh" ] || { echo "no .gpu/bin/book.sh: run the GPU notes' prepare first"; exit 3; }
STASH=${STASH:?set STASH to the folder the first call (stash.sh) filled}
OUT=${OUT:-$root/.gpu/lanes}; mkdir -p "$OUT"
cp -n "$STASH"/*.whl "$root"/.gpu/b/whl/ 2>/dev/null
# the serve extra (chapter 11, the serve bench), where tests/gpu/serve_wheels.sh stashed it on this machine
if [ -d /tmp/serve-stash ]; then
  bash "$root"/tests/gpu/serve_wheels.sh install && export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
fi
s=$(date +%s)
bash "$B"/env.sh python3 -c "from nanovllm import LLM; LLM(max_model_len=256).shutdown()" > "$OUT"/warm.log 2>&1 \
  || { echo "warm-up failed:"; tail -20 "$OUT"/warm.log; exit 3; }
echo "model ready in $(( $(date +%s) - s )) s"
i=0
for lane in "$@"; do
  i=$((i + 1)); gib=${lane%%:*}; chapters=${lane#*:}
  mkdir -p "$OUT/lane$i"
  # shellcheck disable=SC2086  # the chapters are words
  OUT=$OUT/lane$i bash "$B"/book.sh ${gib:+--gib $gib} --deadline "${DEADLINE:-420}" $chapters \
    > "$OUT/lane$i/summary.txt" 2>&1 &
done
wait
for d in "$OUT"/lane*; do cat "$d"/summary.txt; done
for log in "$OUT"/lane*/ch*.log; do
  if grep -qE "^FAILED|[0-9]+ failed" "$log"; then
    echo "== $log"; grep -E "^FAILED|Error|error:|assert" "$log" | head -30
  fi
done
