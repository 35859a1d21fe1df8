#!/usr/bin/env bash
# The GPU run, for the device tool, in two prepared calls (benchmarks/RESULTS.md, "GPU run"):
#   OUT=$OUT bash benchmarks/run_gpu.sh            part 1: correctness, adaptive encode, training step,
#                                                  then the attention / VQ sweeps (budget 420 s)
#   OUT=$OUT bash benchmarks/run_gpu.sh --part 2   part 2: rollouts, CUDA graph, torch.compile, stage 2,
#                                                  the D=64 head layout (budget 300 s)
# results.json, results.md and log.txt land in $OUT (out/gpu_suite/partN when OUT is unset); other
# arguments go to gpu_suite (--budget, --sections, --smoke). Runs from the source tree with no
# installs (the GPU machine has no package registry) and nothing that needs no GPU: the ahead-of-time
# compile check (python -m benchmarks.aot_check) runs on a CPU, before the call.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
part=1
prev=""
for arg in "$@"; do
    [ "$prev" = "--part" ] && part="$arg"
    case "$arg" in --part=*) part="${arg#--part=}" ;; esac
    prev="$arg"
done
OUT="${OUT:-out/gpu_suite/part$part}"
mkdir -p "$OUT"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
