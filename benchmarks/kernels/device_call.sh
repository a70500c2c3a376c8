#!/bin/bash
# One device call (issue 5): kernel sweep + table, then an optional second job.
#   bash benchmarks/kernels/device_call.sh kernels   # sweep + main table + GPTQ on 4 blocks
#   bash benchmarks/kernels/device_call.sh batch1    # batch-1 sweep (split-K variants) + table, GPTQ on 2 blocks
#   bash benchmarks/kernels/device_call.sh kn        # triton_kn batch-1 sweep + table (4/2/8 bits), decode (kn layout)
#   bash benchmarks/kernels/device_call.sh decode    # end-to-end decode (layers from $LAYERS)
#   bash benchmarks/kernels/device_call.sh next7     # session 7's untimed work: the CUDA kernel tests (fused release,
#                                                    # >48 KB shared memory, whole-row vq, batch-16 mma), decode
#                                                    # (q/k/v, gate/up fused: the default), mma at batches 4 and 16, vq rows
#   GEMM_CFGS=... bash benchmarks/kernels/device_call.sh gemm1  # Triton GEMM on rk words (batch 256): its tests, a config
#                                                    # sweep beside dequantize + cuBLAS, then the cuda_int GPU tests
#   bash benchmarks/kernels/device_call.sh final11   # session 11's close: batches 64/256 (4/2-bit) beside dequantize
#                                                    # + cuBLAS, then every GPU test of the int kernels
#   bash benchmarks/kernels/device_call.sh table8    # the table in one run: batches 1/16/256, 4/2/8/3 bits, both
#                                                    # harnesses at batch 1 (cuda-int, kn, int4pack, int8pack, BF16)
#   bash benchmarks/kernels/device_call.sh pdl15     # session 14's untimed work: the GPU tests of the PDL paths (gd 2,
#                                                    # coherent x under gd, the vq kernels' gd), the 4-bit table at
#                                                    # batches 1/4/16, and the vq presets with gd against without
#   bash benchmarks/kernels/device_call.sh vq16      # session 15's close: the vq GPU tests with vc1 in the 2-bit
#                                                    # preset, the single compile and the fp16 table (th), and the
#                                                    # presets (configs 8, 9) beside v15's (5, 7) and with th (10, 11)
#   bash benchmarks/kernels/device_call.sh vqr       # session 18: the vq kernels' GPU tests (-x), then the 2-bit
#                                                    # preset's split-K kernel at CUDA configs VQCFGS
#   bash benchmarks/kernels/device_call.sh grain     # sessions 30-31: the batch-1 GEMV's configs RC (room left for
#                                                    # the next launch: bps; a whole row a tile) and ablations, then
#                                                    # the read floor, also in the GEMV's shape of work (--persistent);
#                                                    # session 31 also ran K split over the grid (ks; removed: slower)
#   (session 31: lastpiece, each warp's last piece of 32 or 64 chunks: measured slower, removed with its launch option)
#   bash benchmarks/kernels/device_call.sh l2pf2     # session 31: the L2-prefetch GPU tests (xp), then 4/2/3/8 bits
#                                                    # with and without xp 2 in each width's config shape (RC), one
#                                                    # process (the first call of that session, l2pf, timed an earlier
#                                                    # form that also requested the next row groups' tiles); the third
#                                                    # call: BITS=2,8,4 RC=the 2- and 8-bit defaults with xp 0, 4-bit xp 2
#   bash benchmarks/kernels/device_call.sh lean      # session 32: the lean loads' GPU tests (lt), then each width's
#                                                    # default with lt 0 and 1 (AC), whole and without the
#                                                    # decode (ABL), one process (BITS, default 4,2,3,8)
#   bash benchmarks/kernels/device_call.sh table33   # session 32's close: the GPU tests of the GEMV's defaults, then the
#                                                    # issue's kernel table (4-bit at batches 1/16/256, 3/2/8 bits)
#   bash benchmarks/kernels/device_call.sh geo33     # session 32: row/chunk geometries and xp under lt 1 (AC), one process
#   bash benchmarks/kernels/device_call.sh final33   # session 32's last call: the new defaults' GPU tests, then batch 1
#   (session 33: lean2, lt 2 beside lt 1 at every width: measured slower, removed with its launch option value)
#   bash benchmarks/kernels/device_call.sh geo34     # session 33: per width its own config sets beside the default,
#                                                    # one process a width (AC3, AC2, AC4): 3-bit xp 2, 2- and 4-bit
#                                                    # geometries geo33 left out
#   bash benchmarks/kernels/device_call.sh final34   # session 33's last call: the SHAPES GPU tests, 4096x4096 geometries
#                                                    # at 4/3/8 bits, two more at 2-bit 11008x4096 and 4096x14336,
#                                                    # then batch 1 with the defaults at every width
#   bash benchmarks/kernels/device_call.sh t1024     # session 33: 1024-thread blocks (32 warps a SM, x staged once a SM
#                                                    # by all of them) at every width, r 1-2 u 1-4 (AC), twice, one
#                                                    # process each
#   bash benchmarks/kernels/device_call.sh xpprobe   # prepared in session 31, run in session 32: why xp pays at 2 and 8 bits but
#                                                    # not at 4 (NOTES v32): each width's default with xp 0 and 2, each
#                                                    # with no part, the decode, the staging and both left out, one
#                                                    # process (BITS, default 4,2,8)
#   MW=... bash benchmarks/kernels/device_call.sh mmaw  # session 19: the batch 2-16 kernel's GPU tests (-k mma_w, -x),
#                                                    # then its configs MW beside the default at batches 16 and 4
#                                                    # (EXTRA: more bench_cuda_int.py options, e.g. --rows-cfgs)
#   bash benchmarks/kernels/device_call.sh hfgraph   # sessions 26-27: the hf_graph and runtime GPU tests, then the decode
#                                                    # in transformers' generate under leanq.hf_graph with inductor's
#                                                    # PDL, without, and with the stop check every step (graph-sync)
#                                                    # beside transformers' default (MODES), one process
#   bash benchmarks/kernels/device_call.sh prefill   # session 27 (prepared): the hf_graph GPU tests, then what a generate
#                                                    # costs besides its steps with the prompt's forward compiled
#                                                    # (fixed_cost_probe.py --prefill); then, as a second call,
#                                                    # MODES=graph-pdl-prefill,graph-pdl,all ... hfgraph
#   bash benchmarks/kernels/device_call.sh fold      # session 27 (prepared): the prologue and fold GPU tests, then the
#                                                    # decode with and without the norms and SiLU x up folded into
#                                                    # the GEMVs (bench_decode.py --unfolded --fold), one process
#   bash benchmarks/kernels/device_call.sh tail      # session 28: the fold, layer-tail and PDL-mode GPU tests and the
#                                                    # hf_graph ones (TK), then the decode (4-bit folded: the
#                                                    # default; EXTRA=--unfolded) in MODES, one process
#   bash benchmarks/kernels/device_call.sh rope      # session 29: the rope-cache kernel's GPU tests and the fold/hf_graph
#                                                    # ones (TK), then the profile of the folded decode (one step's
#                                                    # kernels listed to $OUT/step-int4.txt); NOPROF=1 skips it
#   bash benchmarks/kernels/device_call.sh ropedec   # session 29: the decode with the attention folded after the rest
#                                                    # (bench_decode.py --no-rope --fold) in MODES, one process
#   bash benchmarks/kernels/device_call.sh attn      # session 29 (prepared, not run): the decode-attention and rope
#                                                    # GPU tests (PDL, advance-once among them), then the decode
#                                                    # plain and with each prepared variant (VARIANTS, default
#                                                    # pdl,once,chunk512,pdl+once) in MODES, one process; then
#                                                    # the profile of PROF (default pdl+once; one step listed to
#                                                    # $OUT/step-attn.txt)
#   bash benchmarks/kernels/device_call.sh vqc       # session 17: the 16-codeword cluster kernel's GPU tests, then
#                                                    # its configs (CL) beside the 2-bit preset's kernel, graph harness
#   bash benchmarks/kernels/device_call.sh mmax      # session 34: the x kernel's GPU tests (x in registers, batches 2-16),
#                                                    # then its configs XC beside the w kernel at batches MB (16)
#   bash benchmarks/kernels/device_call.sh final35   # session 34's last call: the x kernel's GPU tests and the w kernel's
#                                                    # (reference, graph, PDL chain), then batch 16 with both kernels
#   bash benchmarks/kernels/device_call.sh xncu      # prepared in session 34 (not run): where the batch-16 kernels stall,
#                                                    # ncu (speed of light, memory, warp states, scheduler) of the x
#                                                    # kernel whole and without decode (abl 2), the w kernel and the
#                                                    # batch-1 GEMV at SH (14336x4096), then the x kernel's source-level
#                                                    # stall samples (CSV) and the probe's timings with ablations
# Each step runs under its own timeout so a slow step cannot eat the call; logs and JSON go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import sys,torch,triton,transformers;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'transformers',transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# bench_vq.py in the graph harness at batch 1 with the given options; its graph rows (and any errors) to vq.log
vq_graph() {
  (cd benchmarks/kernels && PYTHONPATH=../../src timeout "${T3:-240}" python3 bench_vq.py --out "$OUT" --graph \
    --batches 1 --old-configs 0 --kn 2 "$@" 2>&1 | grep -E "graph|error" | tail -80 | tee "$OUT/vq.log")
}
# the GEMV's GPU tests -k TK (default $1), then bench_cuda_int.py at bits BITS (default $2) with the per-warp configs RC
# (default $3) beside each width's default in one process; more options after the third argument
rows_call() {
  local tk=$1 bits=${BITS:-$2} rc=${RC:-$3}; shift 3
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-$tk}" 2>&1 | tail -4 | tee "$OUT/tests.log"
  timeout "${T2:-400}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits "$bits" --no-single \
    --reps 20 --sweep-bits "$bits" --rows-cfgs "$rc" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -E "sweep|ablate|cuda-int |failed|Error"
}
case "$1" in
kernels)
  timeout "${T1:-165}" python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --sweep --v3 --reps 25 \
    --other-batches 1,16 2>&1 | tee "$OUT/bench.log"
  LEANQ_PROFILE=1 timeout "${T2:-55}" python3 benchmarks/decode/bench_decode.py gptq --out "$OUT" --layers 4 \
    2>&1 | tee "$OUT/gptq.log" ;;
batch1)
  timeout "${T1:-150}" python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --sweep1 --reps 25 --batches 1 \
    2>&1 | tee "$OUT/bench1.log"
  LEANQ_PROFILE=1 timeout "${T2:-70}" python3 benchmarks/decode/bench_decode.py gptq --out "$OUT" --layers 2 \
    2>&1 | tee "$OUT/gptq.log" ;;
final)
  timeout "${T1:-90}" python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --sweep1 --reps 25 --batches 1,16,256 \
    --other-batches 1 --bits 4,2,8,3 2>&1 | tee "$OUT/bench.log"
  timeout "${T2:-140}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --layers "${LAYERS:-8}" \
    --reps 2 --tuned "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/decode.log" ;;
kn)
  timeout "${T1:-330}" python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --sweep-kn --graph-table --reps 25 \
    --batches 1 --bits 4,2,8 2>&1 | tee "$OUT/bench.log"
  timeout "${T2:-200}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --layers "${LAYERS:-8}" \
    --reps 2 --layout kn --tuned "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/decode.log" ;;
decode)
  timeout "${T1:-200}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --layers "${LAYERS:-16}" \
    --reps 2 2>&1 | tee "$OUT/decode.log" ;;
table8)
  timeout "${T1:-400}" python3 benchmarks/kernels/bench_kernels.py --out "$OUT" --graph-table --reps 25 \
    --batches 1,16,256 --bits 4,2,8,3 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
next7)
  timeout "${T1:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda_int.py tests/test_kernels_vq.py \
    2>&1 | tail -15 | tee "$OUT/tests.log"
  timeout "${T2:-200}" python3 benchmarks/decode/bench_decode.py decode --layout rk --out "$OUT" --reps 3 \
    2>&1 | grep -E '^(bf16|int4) |speedup|ratio|Error' | tee "$OUT/decode.log"
  timeout "${T4:-150}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --reps 20 --bits 4,2 --mma 4,16 \
    2>&1 | grep -E "M=|cuda-int " | tee "$OUT/mma.log"
  (cd benchmarks/kernels && PYTHONPATH=../../src timeout "${T3:-200}" python3 bench_vq.py --out "$OUT" --graph \
    --cuda 0,5 --rows 256/2/1,512/1/2,512/2/1,1024/1/1 2>&1 | grep '"kind": "best"\|graph' | tail -40 | tee "$OUT/vq.log") ;;
gemm1)
  timeout "${T0:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton_gemm.py 2>&1 | tail -5 \
    | tee "$OUT/tests_gemm.log"
  timeout "${T1:-260}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4 --mma 256 --no-single \
    --reps 10 --gemm-cfgs "$GEMM_CFGS" 2>&1 | grep -E "M=|geometric|  M=" | tee "$OUT/gemm.log"
  timeout "${T2:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda_int.py \
    tests/test_kernels_dispatch.py 2>&1 | tail -8 | tee "$OUT/tests.log" ;;
final11)
  timeout "${T1:-240}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4,2 --mma 64,256 --no-single \
    --reps 10 2>&1 | grep -E "M=|geometric|failed|  M=" | tee "$OUT/gemm.log"
  PYTHONPATH=src:tests timeout "${T2:-330}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda_int.py \
    tests/test_kernels_dispatch.py tests/test_kernels_triton_gemm.py tests/test_kernels_cuda_wgmma.py 2>&1 | tail -8 \
    | tee "$OUT/tests.log" ;;
pdl15)
  PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_vq.py \
    tests/test_kernels_cuda_int.py -k "pdl or cuda_vq or configs_agree or mma_w_matches" 2>&1 | tail -4 \
    | tee "$OUT/tests.log"
  timeout "${T2:-150}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4 --no-single --mma 16,4 \
    --mma-lite --reps 20 2>&1 | grep -E "int4 cuda-int |M=(4|16) +cuda-int-mma-w|geometric" | tee "$OUT/int4.log"
  (cd benchmarks/kernels && PYTHONPATH=../../src timeout "${T3:-200}" python3 bench_vq.py --out "$OUT" --graph \
    --old-configs 0 --kn 2 --cuda 0,5,6,7 2>&1 | grep -E "graph" | tail -40 | tee "$OUT/vq.log") ;;
vq16)
  PYTHONPATH=src:tests timeout "${T1:-330}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_vq.py 2>&1 \
    | tail -4 | tee "$OUT/tests.log"
  (cd benchmarks/kernels && PYTHONPATH=../../src timeout "${T3:-200}" python3 bench_vq.py --out "$OUT" --graph \
    --batches 1 --old-configs 0 --kn 2 --cuda 5,7,8,9,10,11 2>&1 | grep -E "graph" | tail -40 | tee "$OUT/vq.log") ;;
vqc)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_vq_cluster.py 2>&1 | tail -15 | tee "$OUT/tests.log"
  vq_graph --settings "${SETS:-vq2,vq2c}" --cuda 8 --cluster "${CL:-256/8/1,512/8/1,256/8/2,128/8/1,256/4/1}" ;;
vqr)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-200}" python3 -m pytest -q -x -p no:cacheprovider \
    ${TESTS:-tests/test_kernels_vq.py tests/test_kernels_vq_cluster.py} 2>&1 | tail -60 | tee "$OUT/tests.log"
  vq_graph --settings "${SETS:-vq2}" --cuda 8 --cuda-cfgs "${VQCFGS:-stat/t128/n4/v16/vo8/b4/gd1/ec1/cw4}" ;;
hfgraph)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_hf_graph.py tests/test_runtime.py 2>&1 | tail -5 | tee "$OUT/tests.log"
  timeout "${T2:-430}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --reps 3 \
    --compile-modes "${MODES:-graph-pdl,graph,graph-sync,all}" 2>&1 | tee "$OUT/decode.log" | grep -E "speedup|Error|Traceback" ;;
fold)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-200}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "prologue or fold or taken_over or fused" 2>&1 | tail -5 | tee "$OUT/tests.log"
  timeout "${T2:-380}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --reps 3 --unfolded --fold \
    --compile-modes "${MODES:-graph-pdl,graph}" 2>&1 | tee "$OUT/decode.log" | grep -E "speedup|folds|Error|Traceback" ;;
tail)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-200}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_cuda_int.py tests/test_hf_graph.py tests/test_runtime.py tests/test_cli.py \
    -k "${TK:-fold or tail or pdl_mode or hf_graph or graph or releases_the_integer}" \
    2>&1 | tail -15 | tee "$OUT/tests.log"
  timeout "${T2:-400}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --reps 3 $EXTRA \
    --compile-modes "${MODES:-graph-pdl,graph,graph-pdl-prefill,graph-prefill}" 2>&1 | tee "$OUT/decode.log" \
    | grep -E "speedup|folds|Error|Traceback" ;;
rope)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-260}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_rope_cache.py tests/test_kernels_decode_attention.py tests/test_kernels_cuda_int.py \
    tests/test_hf_graph.py tests/test_cli.py \
    -k "${TK:-rope or attention or fold or tail or hf_graph or graph or releases_the_integer}" 2>&1 | tail -15 | tee "$OUT/tests.log"
  [ -n "$NOPROF" ] || timeout "${T2:-200}" python3 benchmarks/decode/profile_decode.py --graph --new-tokens 64 \
    --no-table --listing "$OUT/step-int4.txt" 2>&1 | grep -v Warning | tee "$OUT/profile.log" | tail -32 ;;
ropedec)
  timeout "${T2:-560}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --reps 3 --no-rope --fold $EXTRA \
    --compile-modes "${MODES:-graph,graph-pdl}" 2>&1 | tee "$OUT/decode.log" | grep -E "speedup|folds|Error|Traceback" ;;
attn)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_decode_attention.py tests/test_kernels_rope_cache.py -k "${TK:-pdl or gpu or released or once}" \
    2>&1 | tail -5 | tee "$OUT/tests.log"
  timeout "${T2:-400}" python3 benchmarks/decode/bench_decode.py decode --out "$OUT" --reps 3 \
    --attn-after "${VARIANTS:-pdl,once,chunk512,pdl+once}" $EXTRA --compile-modes "${MODES:-graph,graph-pdl}" 2>&1 \
    | tee "$OUT/decode.log" | grep -E "speedup|Error|Traceback"
  [ -n "$NOPROF" ] || timeout "${T3:-150}" python3 benchmarks/decode/profile_decode.py --graph --new-tokens 64 \
    --no-table --attn "${PROF:-pdl+once}" --listing "$OUT/step-attn.txt" 2>&1 | grep -v Warning \
    | tee "$OUT/profile.log" | tail -20 ;;
prefill)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_hf_graph.py 2>&1 | tail -5 | tee "$OUT/tests.log"
  timeout "${T2:-400}" python3 benchmarks/decode/fixed_cost_probe.py --out "$OUT" --prefill 2>&1 | \
    tee "$OUT/fixed.log" | grep -E "^(bf16|int4) |Error|Traceback" ;;
l2pf2)
  rows_call prefetch 4,2,3,8 "512/2/4/1/1/1/1/1/0/2,512/2/4/1/1/1/1/1/0/0,512/2/2/1/1/1/1/1/0/2,512/2/2/1/1/1/1/1/0/0,512/1/4/1/1/1/1/1/0/2,512/1/4/1/1/1/1/1/0/0" ;;
lean)
  # session 32: lean loads (lt 1: unpredicated for whole tiles; the forms once named lt 2 were removed): GPU tests,
  # then each width's default with the option sets AC, whole and without the decode (ABL), one process
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-260}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-lean_tile_loop}" 2>&1 | tail -4 | tee "$OUT/tests.log"
  timeout "${T2:-400}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits "${BITS:-4,2,3,8}" --no-single \
    --reps 20 --ablate "${ABL:-0,1}" --ablate-cfg "${AC:-lt=0,lt=1}" 2>&1 | tee "$OUT/bench.log" \
    | grep -E "ablate|cuda-int |Error" ;;
table33)
  # session 32's close: the GPU tests that run the batch-1 GEMV's defaults (lt 1 among them), then issue 5's kernel
  # table (4-bit with batches 16 and 256, then 3/2/8 bits), two processes
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-330}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-cuda_int_matches_reference or lean_tile_loop or pdl_chain or fold or layer_tail or release_stored or wide_inputs or torch_compile or chosen_at_batch}" \
    2>&1 | tail -4 | tee "$OUT/tests.log"
  mkdir -p "$OUT/a" "$OUT/b"
  timeout "${T2:-110}" python3 benchmarks/kernels/bench_cuda_int.py --bits 4 --no-single --reps 20 --mma 16,256 \
    --mma-lite --out "$OUT/a" 2>&1 | tee "$OUT/a/bench.log" | grep -E "^\|"
  timeout "${T3:-100}" python3 benchmarks/kernels/bench_cuda_int.py --bits 3,2,8 --no-single --reps 20 \
    --out "$OUT/b" 2>&1 | tee "$OUT/b/bench.log" | grep -E "^\|" ;;
geo33)
  # session 32: under lt 1, each width's default beside other row/chunk geometries and xp (AC), one process
  timeout "${T2:-400}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits "${BITS:-4,2,3}" --no-single \
    --reps 20 --ablate 0 --ablate-cfg "${AC:-lt=1,xp=2,xp=0,r=4:u=2,r=2:u=3,r=3:u=2,r=1:u=4,r=4:u=1,r=2:u=2,r=2:u=4}" \
    2>&1 | tee "$OUT/bench.log" | grep -E "ablate|cuda-int |Error" ;;
final33)
  # session 32's last call: the GPU tests of the new defaults (4-bit xp 2, the SHAPES table), then batch 1 at 4 and
  # 2 bits (and 3, 8) with the defaults, one process
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-270}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-shape_table or cuda_int_matches_reference or l2_prefetch_gives or pdl_chain or fold or layer_tail}" \
    2>&1 | tail -4 | tee "$OUT/tests.log"
  timeout "${T2:-120}" python3 benchmarks/kernels/bench_cuda_int.py --bits "${BITS:-4,2,3,8}" --no-single --reps 20 \
    --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -E "^\|" ;;
geo34)
  # session 33: each width's default beside config sets of its own (3-bit xp 2; 2- and 4-bit geometries that geo33 did
  # not time), one process a width
  for w in 3 2 4; do
    eval "ac=\${AC$w}"
    [ -n "$ac" ] || case $w in
      3) ac="lt=1,xp=2" ;;
      2) ac="lt=1,r=1:u=2,r=1:u=3,r=2:u=1,r=3:u=1,threads=256,threads=256:r=1:u=2" ;;
      4) ac="lt=1,r=1:u=3,r=1:u=6,threads=256:r=1:u=4" ;;
    esac
    mkdir -p "$OUT/w$w"
    timeout "${T2:-150}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT/w$w" --bits $w --no-single --reps 20 \
      --ablate 0 --ablate-cfg "$ac" 2>&1 | tee "$OUT/w$w/bench.log" | grep -E "ablate|cuda-int |Error"
  done ;;
final34)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-150}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-shape_table}" 2>&1 | tail -4 | tee "$OUT/tests.log"
  mkdir -p "$OUT/a" "$OUT/b" "$OUT/c"
  timeout 120 python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT/a" --bits 4,3,8 --shapes 4096x4096 --no-single \
    --reps 20 --ablate 0 --ablate-cfg "${ACA:-r=2:u=1,r=4:u=1,r=1:u=2}" 2>&1 | tee "$OUT/a/bench.log" | grep -E "ablate|cuda-int |Error"
  timeout 100 python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT/b" --bits 2 --shapes 11008x4096,4096x14336 \
    --no-single --reps 20 --ablate 0 --ablate-cfg "${ACB:-r=5:u=1,r=6:u=1}" 2>&1 | tee "$OUT/b/bench.log" \
    | grep -E "ablate|cuda-int |Error"
  timeout 120 python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT/c" --bits 4,2,3,8 --no-single --reps 20 2>&1 \
    | tee "$OUT/c/bench.log" | grep -E "^\|" ;;
mmax)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-300}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int_mmax.py 2>&1 | tail -4 | tee "$OUT/tests.log"
  timeout "${T2:-360}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4 --no-single --reps 20 \
    --shapes "${SH:-4096x4096,4096x11008,11008x4096,4096x14336,14336x4096}" --mma "${MB:-16}" --mma-lite \
    --mmax-cfgs "${XC:-nw=8:sp=2,pf=3}" 2>&1 | tee "$OUT/bench.log" | grep -E "M=|Error|failed" ;;
xncu)
  sh=${SH:-14336x4096}; n=${sh%x*}; k=${sh#*x}
  sec="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy"
  for spec in "x" "x abl=2" "w"; do
    cfg=$spec; [ "$spec" = w ] && cfg="7/2/16/3 rs=1 gd=1 xv=3"
    timeout 120 ncu --clock-control none --kernel-name regex:int_mma_ --launch-skip 2 --launch-count 1 $sec \
      python3 benchmarks/kernels/mma_w_probe.py "$n" "$k" 16 $cfg > "$OUT/ncu-${spec// /-}.txt" 2>&1
    grep -E "Duration|Throughput|Issued|Eligible|Active Warps|Stall|cycles per" "$OUT/ncu-${spec// /-}.txt" | head -30
  done
  timeout 120 ncu --clock-control none --kernel-name int_gemv --launch-skip 2 --launch-count 1 $sec python3 -c \
    "import sys; sys.path.insert(0, 'benchmarks/kernels'); import torch, bench_kernels as bk; from leanq.kernels import cuda_int as ci; p = ci.packed_rk(bk.random_layer($n, $k, 4)); x = torch.randn(1, $k, device='cuda', dtype=torch.bfloat16); [ci.run_int_cuda(x, p, None) for _ in range(5)]; torch.cuda.synchronize()" \
    > "$OUT/ncu-gemv.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Issued" "$OUT/ncu-gemv.txt" | head -5
  timeout 150 ncu --clock-control none --kernel-name int_mma_x --launch-skip 2 --launch-count 1 --section WarpStateStats \
    --section SourceCounters --page source --print-source sass --csv python3 benchmarks/kernels/mma_w_probe.py "$n" "$k" 16 x \
    > "$OUT/ncu-x-source.csv" 2>&1
  timeout 120 python3 benchmarks/kernels/mma_w_probe.py "$n" "$k" 16 x --time --abl=1,2,3,4,8 2>&1 | tee "$OUT/probe-x.txt" ;;
final35)
  PYTHONPATH=src:tests timeout "${T1:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda_int_mmax.py \
    tests/test_kernels_cuda_int.py -k "mmax or mma_x or x_kernel or mma_w_matches_reference or mma_w_in_a_cuda_graph \
    or pdl_chain" 2>&1 | tail -4 | tee "$OUT/tests.log"
  timeout "${T2:-200}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4 --no-single --reps 20 \
    --mma 16 --mma-lite 2>&1 | tee "$OUT/bench.log" | grep -E "M=|Error|failed" ;;
t1024)
  for rep in 1 2; do
    mkdir -p "$OUT/p$rep"
    timeout "${T2:-250}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT/p$rep" --bits "${BITS:-2,4,3,8}" \
      --no-single --reps 20 --ablate 0 \
      --ablate-cfg "${AC:-threads=1024:r=1:u=2,threads=1024:r=1:u=4,threads=1024:r=2:u=2,threads=1024:r=2:u=1}" 2>&1 \
      | tee "$OUT/p$rep/bench.log" | grep -E "ablate|cuda-int |Error"
  done ;;
xpprobe)
  timeout "${T2:-400}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits "${BITS:-4,2,8}" --no-single \
    --reps 20 --ablate 0,1,2,3 --ablate-cfg xp=0,xp=2 2>&1 | tee "$OUT/bench.log" | grep -E "ablate|cuda-int |Error" ;;
grain)
  # session 30's leads (NOTES v31): the per-warp GEMV in blocks that leave room on each SM for the next launch's
  # block (bps), a whole row a tile, beside the default and its ablations, then the read floor of the same bytes,
  # also in the GEMV's shape of work
  rows_call configs_agree 4 "256/2/4/1/1/1/1/1/1,256/2/4/1/1/1/1/1/2,128/2/4/1/1/1/1/1/2,128/2/4/1/1/1/1/1/3,512/2/2/1/1/1/1/1/1,256/1/11/1/0/1/1/1/0" \
    --ablate "${ABL:-1,2,3}"
  timeout "${T3:-120}" python3 benchmarks/kernels/read_floor.py --bits "${BITS:-4}" --persistent --out "$OUT" 2>&1 \
    | tee "$OUT/floor.log" | grep -o '"shape[^,]*\|"read_persistent[0-9]_pct_copy": [0-9.]*' | paste - - - ;;
mmaw)
  [ -n "$NOTESTS" ] || PYTHONPATH=src:tests timeout "${T1:-200}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda_int.py -k "${TK:-mma_w}" 2>&1 | tail -30 | tee "$OUT/tests.log"
  timeout "${T2:-330}" python3 benchmarks/kernels/bench_cuda_int.py --out "$OUT" --bits 4 --no-single \
    --mma "${MB-16,4}" --mma-lite --reps 20 --mmaw-cfgs "$MW" $EXTRA 2>&1 | tee "$OUT/bench.log" | grep -v "^ *M=.*skipped" | tail -150 ;;
esac
