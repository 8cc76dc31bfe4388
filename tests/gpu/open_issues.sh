#!/usr/bin/env bash
# What the open issues still need from a GPU, part by part (not run by CI). The parts' time limits add up to more
# than one device call's 10 minutes: name the parts that fit a call. After the GPU notes' `prepare` and their first
# call (stash.sh), from the repository root, carrying .gpu/b and .gpu/bin:
#
#   STASH=/tmp/stash bash tests/gpu/open_issues.sh [PART ...]
#
# PARTS (all when none, in this order; each under its own time limit, its result printed as it ends):
#   switches  switch_tokens.py: the embedded model's greedy replies with PDL and split-K off and on (whether the
#           two can go on by default: chapter 00's reply with them on failed its check in the book, 2026-12-07)
#   book    chapter 12 through nbval on the full card and at 8 GiB, at once (book_lanes.sh)
#   fp8     fp8_check.py's kernels section (the Triton FP8 store bit for bit, decode, prefill)
#   sweep   decode_sweep.py --graph --fp8 at three decode steps: the engine's FP8 launch (K and V read as words,
#           inline PTX) vs other tilings, byte reads and the bfloat16 cache (every launch in $OUT/sweep/)
#   bench   fp8_check.py's seed benchmark, auto vs fp8, on the full card and sized for 8 GiB (the issue's goal:
#           32,000 tok/s with fp8 on an H100)
#   tma     tma_decode.py --bench: the FP8 decode kernel with K and V tiles by TMA, checked against the package's,
#           timed at three decode steps, then the seed benchmark (fp8, blocks of 128) with and without it
#   flat    flat_decode.py --bench: the FP8 decode kernel as one balanced pass over the batch's tiles (words over
#           blocks of 16, TMA over blocks of 128), checked against the package's, timed, then the seed benchmark
#   spec    spec_check.py --skip-equality: acceptance and speed-up at batch 1 and 16, fixed-length runs
#   serve   the serve bench, nanovllm and `transformers serve`, 16 chat requests of 16 tokens at 4 and inf req/s
# Logs go to $OUT (the device call's output folder) or .gpu/open_issues.
set -u
root=$(pwd)
OUT=${OUT:-$root/.gpu/open_issues}; mkdir -p "$OUT"
env_sh=${ENV_SH:-$root/.gpu/bin/env.sh}  # (ENV_SH: another wrapper, to try this script without a GPU)
[ -f "$env_sh" ] || { echo "no $env_sh: run the GPU notes' prepare first"; exit 3; }
parts=${*:-switches book fp8 sweep bench tma flat spec serve}
# the serve extra (chapter 11, the serve bench), where tests/gpu/serve_wheels.sh stashed it on this machine
if [ -d /tmp/serve-stash ]; then
  bash "$root"/tests/gpu/serve_wheels.sh install && export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
fi
run() {  # NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local s; s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - s ))s$([ $rc -eq 124 ] && echo " (timed out after ${limit}s)")"
}
for part in $parts; do
  case $part in
    switches)
      run switches 240 bash "$env_sh" python3 tests/gpu/switch_tokens.py
      grep -vi warn "$OUT/switches.log" | tail -16 ;;
    book)
      run book 200 env OUT="$OUT/lanes" DEADLINE=170 bash tests/gpu/book_lanes.sh ":12" "8:12"
      cat "$OUT/book.log" ;;
    fp8)
      run fp8 90 bash "$env_sh" python3 tests/gpu/fp8_check.py --only kernels --out "$OUT/fp8"
      grep -E "^(PASS|FAIL)|Error" "$OUT/fp8.log" ;;
    sweep)
      mkdir -p "$OUT/sweep"
      run sweep 150 bash "$env_sh" python3 tests/gpu/decode_sweep.py --graph --fp8 --steps 200,600,900 --out "$OUT/sweep"
      grep -E "^step|Error" "$OUT/sweep.log" ;;
    bench)
      run bench 150 bash "$env_sh" python3 tests/gpu/fp8_check.py --only bench --out "$OUT/bench"
      run bench8 150 bash "$env_sh" python3 tests/gpu/fp8_check.py --only bench --cap-gib 8 --out "$OUT/bench8"
      grep -hE "seed:|^(PASS|FAIL)|Error" "$OUT/bench.log" "$OUT/bench8.log" ;;
    tma)
      run tma 300 bash "$env_sh" python3 tests/gpu/tma_decode.py --bench
      grep -E "^(check|step|seed)|Error" "$OUT/tma.log" ;;
    flat)
      run flat 330 bash "$env_sh" python3 tests/gpu/flat_decode.py --bench
      grep -E "^(check|step|  |seed|FAIL)|Error" "$OUT/flat.log" ;;
    spec)
      run spec 120 bash "$env_sh" python3 tests/gpu/spec_check.py --skip-equality
      grep -E "batch|PASS|FAIL|done" "$OUT/spec.log" ;;
    serve)
      run serve 200 bash "$env_sh" python3 -m nanovllm.bench --workload serve --engine nanovllm,hf \
        --prompt-kind chat --num-requests 16 --request-rate 4 inf --output-len 16 16 --json "$OUT/serve.jsonl"
      grep -E "serve chat|hf:|FAILED|Error" "$OUT/serve.log" | tail -20 ;;
    *) echo "unknown part $part (switches, book, fp8, sweep, bench, tma, flat, spec, serve)"; exit 2 ;;
  esac
done
