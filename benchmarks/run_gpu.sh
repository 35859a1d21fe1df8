#!/usr/bin/env bash
# The one-shot GPU run, for the device tool: results.json, results.md and log.txt land in $OUT
# (out/gpu_suite when OUT is unset). Extra arguments go to gpu_suite (--budget, --sections, --smoke).
# Runs from the source tree with no installs: the GPU machine has no package registry.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-out/gpu_suite}"
mkdir -p "$OUT"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
