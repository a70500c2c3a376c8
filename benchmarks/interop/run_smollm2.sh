#!/usr/bin/env bash
# Issue 8, acceptance 1 and 2 on SmolLM2-135M, in one command (CPU, one thread per job):
#
#   bash benchmarks/interop/run_smollm2.sh [OUT]        # OUT defaults to out/interop
#
# 1. makes the leanq checkpoints it needs unless they exist (out/smol-*):
#      gptq4      GPTQ int4 g128 asym (leanq's default): Q8_0 and Q4_1 copy it exactly, Q4_0 requantizes it
#      gptq4sym   GPTQ int4 g128 sym: Q4_0 copies it exactly
#      rtn4sym    RTN  int4 g128 sym: Q4_0 copies it exactly
#      rtn8sym    RTN  int8 g128 sym: Q8_0 copies it exactly
# 2. compressed-tensors: export gptq4, load it in transformers, compare logits and greedy text (check_exports.py)
# 3. GGUF: export each to Q4_0 / Q8_0 (/ Q4_1), run in llama.cpp (llama-cpp-python), perplexity on the
#    core protocol vs leanq's evaluation of the same checkpoint (llamacpp_ppl.py)
# Needs: LEANQ_DATA (default ../shared/data), compressed-tensors, llama-cpp-python (pip install llama-cpp-python==0.3.36).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-out/interop}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LEANQ_DATA=${LEANQ_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p "$OUT"

make_ck() {  # make_ck DIR leanq-quantize-args...
  local dir=$1; shift
  if [ ! -f "$dir/leanq.json" ]; then
    echo "== quantizing $dir" >&2
    $PY -m leanq quantize smollm2-135m "$@" --out "$dir" 2>&1 | tail -3
  fi
}
make_ck out/smol-gptq4 --method gptq --bits 4 --group-size 128
make_ck out/smol-gptq4sym --method gptq --bits 4 --group-size 128 --sym
make_ck out/smol-rtn4sym --method rtn --bits 4 --group-size 128 --sym
make_ck out/smol-rtn8sym --method rtn --bits 8 --group-size 128 --sym

echo "== acceptance 1: compressed-tensors in transformers" >&2
$PY benchmarks/interop/check_exports.py out/smol-gptq4 --work "$OUT" --gguf-types "" --json-out "$OUT/ct_smollm2.json" \
  > "$OUT/ct_smollm2.log" 2>&1 || { tail -40 "$OUT/ct_smollm2.log"; exit 1; }
tail -40 "$OUT/ct_smollm2.log"

echo "== acceptance 2: GGUF in llama.cpp, 48 windows" >&2
$PY benchmarks/interop/llamacpp_ppl.py out/smol-gptq4@Q8_0,Q4_1,Q4_0 out/smol-gptq4sym@Q4_0 out/smol-rtn4sym@Q4_0 \
  out/smol-rtn8sym@Q8_0 --work "$OUT" --max-windows 48 --threads 1 --json-out "$OUT/llamacpp_smollm2.json"
