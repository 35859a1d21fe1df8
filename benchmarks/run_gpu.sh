#!/usr/bin/env bash
# The one-shot GPU run, for the device tool: results.json, results.md and log.txt land in $OUT
# (out/gpu_suite when OUT is unset). Extra arguments go to gpu_suite (--budget, --sections, --smoke).
# Runs from the source tree with no installs: the GPU machine has no package registry.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-out/gpu_suite}"
mkdir -p "$OUT"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
status=$?
# the ahead-of-time compile check of the kernels (registers, spills, shared memory, tensor-core
# instructions for sm_90 / sm_80 / sm_89; CI subset, ~30 s on 16 cores), recorded with the run
PYTHONPATH=. timeout 90 python3 -m benchmarks.aot_check --subset ci --workers 8 --json "$OUT/aot_check.json" \
    > "$OUT/aot_check.txt" 2>&1 || echo "aot_check failed or timed out: see aot_check.txt" | tee -a "$OUT/log.txt"
exit $status
