#!/usr/bin/env bash
# Checks and timings on the GPU machine in one go, from the repository root (not run by CI):
#
#   bash tests/gpu/run_all.sh checks    # engine + kernel checks, the Triton/overlap pytest files on the GPU
#   bash tests/gpu/run_all.sh bench [N] # the seed benchmark N times (default 3)
#   bash tests/gpu/run_all.sh latency   # where the time to first token goes (ttft_profile.py), then the
#                                       # bench's latency workload on 1000-token prompts, nanovllm and HF
#
# BASELINE=DIR (a folder holding an earlier commit's nanovllm/, e.g. from `git archive REV nanovllm`) runs
# that version's benchmark beside each run of this one, alternating, so the two are compared on one card in
# one session.  Logs and the JSON lines of the benchmark go to $OUT (default /tmp/nanovllm-gpu).
set -u
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
root=$(pwd)
what=${1:-checks}
if [ "$what" = checks ]; then
  s=$(date +%s); PYTHONPATH=. python3 tests/gpu/engine_check.py --only checks --out "$OUT" > "$OUT"/engine_check.log 2>&1
  echo "engine_check rc=$? $(( $(date +%s) - s ))s: $(grep -cE '^PASS' "$OUT"/engine_check.log) PASS, $(grep -cE '^FAIL' "$OUT"/engine_check.log) FAIL"
  s=$(date +%s); PYTHONPATH=. python3 tests/gpu/kernel_check.py --no-bench > "$OUT"/kernel_check.log 2>&1
  echo "kernel_check rc=$? $(( $(date +%s) - s ))s: $(tail -1 "$OUT"/kernel_check.log)"
  s=$(date +%s); PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton_kernels.py \
    tests/test_triton_gemm.py tests/test_triton_sampler.py tests/test_overlap.py tests/test_kernel_selection.py \
    tests/test_prefill_graphs.py tests/test_sampling_features.py \
    > "$OUT"/pytest_gpu.log 2>&1
  echo "pytest on the GPU rc=$? $(( $(date +%s) - s ))s: $(tail -1 "$OUT"/pytest_gpu.log)"
elif [ "$what" = bench ]; then
  for i in $(seq "${2:-3}"); do
    for version in new ${BASELINE:+baseline}; do
      dir=$root; [ "$version" = baseline ] && dir=$BASELINE
      (cd "$dir" && PYTHONPATH=. python3 -m nanovllm.bench --engine nanovllm --json "$OUT/bench_$version.jsonl" \
        > "$OUT/bench_${version}_$i.log" 2>&1)
      echo "$version run $i: $(grep -E 'nanovllm  seed' "$OUT/bench_${version}_$i.log" | sed 's/.*= //')" \
           "| $(grep -E 'prefill:|decode:' "$OUT/bench_${version}_$i.log" | sed 's/ (.*//' | tr -s ' ' | paste -sd';')"
    done
  done
elif [ "$what" = latency ]; then
  PYTHONPATH=. python3 tests/gpu/ttft_profile.py --no-profile > "$OUT"/ttft.log 2>&1
  echo "ttft_profile rc=$?"; grep -vE "Warning|warn" "$OUT"/ttft.log
  for version in new ${BASELINE:+baseline}; do
    dir=$root; engines=nanovllm,hf
    [ "$version" = baseline ] && dir=$BASELINE && engines=nanovllm
    (cd "$dir" && PYTHONPATH=. python3 -m nanovllm.bench --workload latency --engine $engines --prompt-len 1000 1000 --num-requests 16 \
      --json "$OUT/latency_$version.jsonl" > "$OUT/latency_$version.log" 2>&1)
    echo "latency $version rc=$?:"; grep -E "latency:|FAILED|/ hf" "$OUT/latency_$version.log"
  done
fi
