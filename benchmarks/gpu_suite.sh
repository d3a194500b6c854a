#!/usr/bin/env bash
# The GPU runs behind the numbers in the README and closing notes, in the order they were made:
#   benchmarks/gpu_suite.sh tests   -> the gpu-marked tests (log under $OUT); `kernels`: every kernel test on CUDA
#   benchmarks/gpu_suite.sh invariance -> the first kernel breaking batch invariance, if any (check_batch_invariance.py)
#   benchmarks/gpu_suite.sh experts -> MXFP4/bf16 expert kernel bandwidth (bench_mxfp4_experts.json)
#   benchmarks/gpu_suite.sh decode  -> mini decode vs HF eager / reference / torch.compile / floor (bench_decode.json)
#   benchmarks/gpu_suite.sh profile -> GPU time per kernel inside the decode step's CUDA graph (profile_step.json)
#   benchmarks/gpu_suite.sh dflash  -> DFlash oracle / random draft vs plain decoding (bench_dflash.json)
#   benchmarks/gpu_suite.sh logits  -> triton and the bf16 reference, each against fp32 truth (logits_error.json)
#   benchmarks/gpu_suite.sh floor   -> plain reads of one row's experts call, every way, fastest first (read_floor.json)
#   benchmarks/gpu_suite.sh dense   -> the dense projections and the router at 1 and 8 rows (bench_dense_tiles.json)
#   benchmarks/gpu_suite.sh pdl     -> the MXFP4 step at 1 and 8 rows with programmatic dependent launch off, then on
#   benchmarks/gpu_suite.sh prefill -> time to first token beside HF eager (bench_prefill.json), and one layer's experts
#                                      at prefill sizes beside the reference ops (bench_moe_prefill.json)
# Each stage writes JSON and a log under ${OUT:-out}/ and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for stage in "$@"; do
  case "$stage" in
    # the gpu-marked tests, and the batch-invariance test that is bitwise only on a GPU (full logs under $OUT)
    tests) per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 180")  # names a hung test
           timeout 540 python3 -m pytest -v -rs --durations=15 $per_test -m gpu tests > "$OUT/gpu_tests.log" 2>&1
           CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 -m pytest -q \
             tests/test_triton_backend.py::test_verify_step_rows_equal_decode_steps > "$OUT/gpu_invariance_test.log" 2>&1
           grep -E "(PASSED|FAILED|ERROR|SKIPPED|Timeout)|passed|failed|s call" "$OUT/gpu_tests.log" "$OUT/gpu_invariance_test.log" ;;
    # op by op: the first kernel whose rows differ between an 8-row step and 1-row steps (bf16 and MXFP4 mini)
    invariance) timeout 200 python3 benchmarks/check_batch_invariance.py --out "$OUT/inv_bf16" 2>&1 | tail -14
                timeout 200 python3 benchmarks/check_batch_invariance.py --mxfp4 --out "$OUT/inv_mxfp4" 2>&1 | tail -14 ;;
    kernels) timeout 420 python3 -m pytest -q tests/test_triton_kernels.py 2>&1 | tail -20 | tee "$OUT/kernels.log" ;;
    experts) timeout 240 python3 benchmarks/bench_mxfp4_experts.py --out "$OUT" 2>&1 | tail -40 ;;
    decode) timeout 560 python3 benchmarks/bench_decode.py --out "$OUT" 2>&1 | tail -60 ;;
    profile) timeout 150 python3 benchmarks/profile_step.py --out "$OUT" 2>&1 | grep -v -i warn | tail -40 ;;
    dflash) timeout 300 python3 benchmarks/bench_dflash.py --out "$OUT" 2>&1 | tail -30 ;;
    logits) timeout 200 python3 benchmarks/logits_error.py --out "$OUT" 2>&1 | tail -12 ;;
    floor) timeout 400 python3 benchmarks/read_floor.py --out "$OUT" --experts 8 --repeats 2 > "$OUT/read_floor.log" 2>&1
           head -12 "$OUT/read_floor.log" ;;
    dense) timeout 300 python3 benchmarks/bench_dense_tiles.py --out "$OUT" 2>&1 | grep -v "^\[" ;;
    pdl) for rows in 1 8; do for pdl in 0 1; do
           TILEC_PDL=$pdl timeout 140 python3 benchmarks/profile_step.py --mxfp4 --rows $rows \
             --out "$OUT/pdl${pdl}_rows$rows" > "$OUT/pdl${pdl}_rows$rows.log" 2>&1
           echo "TILEC_PDL=$pdl: $(grep -m1 "CUDA-graph step" "$OUT/pdl${pdl}_rows$rows.log")"
         done; done ;;
    prefill) timeout 200 python3 benchmarks/bench_prefill.py --out "$OUT" 2>&1 | grep -v -i warn | tail -14
             timeout 200 python3 benchmarks/bench_moe_prefill.py --out "$OUT" 2>&1 | tail -16 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
