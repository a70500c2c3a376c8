#!/usr/bin/env bash
# Issue 4 on a lent GPU: sensitivity pass, proxy check, plans at 4.25 / 3.25 / 2.5 bpw and the planned vs
# uniform evaluations (benchmarks/hybrid_bench.py), RTN without clip search for planned and uniform alike.
# Same set-up as benchmarks/quality/gpu_run.sh (SmolLM2's GGUF from the two carried halves, data at
# /root/m/data); everything lands in /root/hybrid and is copied to $OUT. Extra arguments go to every stage.
set -e
. benchmarks/quality/gpu_setup.sh  # model, data, gguf wheel, environment
O=/root/hybrid
python3 benchmarks/hybrid_bench.py --device cuda --out $O --weighting fisher --stage sens check plan eval \
  --check-modules 12 --configs P4.25 U4:g64 U4:g128 P3.25 U3:g64 U3:g128 P2.5 U2:g32 U2:g64 "$@"
cp $O/results.jsonl $O/sensitivity*.json "$OUT"/ 2>/dev/null || true
