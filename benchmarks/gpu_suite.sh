#!/usr/bin/env bash
# The GPU runs behind the numbers in the README and closing notes, in the order they were made:
#   benchmarks/gpu_suite.sh tests   -> the gpu-marked tests (log under $OUT); `kernels`: every kernel test on CUDA
#   benchmarks/gpu_suite.sh experts -> MXFP4/bf16 expert kernel bandwidth (bench_mxfp4_experts.json)
#   benchmarks/gpu_suite.sh decode  -> mini decode vs HF eager / reference / torch.compile / floor (bench_decode.json)
#   benchmarks/gpu_suite.sh dflash  -> DFlash oracle / random draft vs plain decoding (bench_dflash.json)
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
    tests) timeout 300 python3 -m pytest -q -m gpu -rs 2>&1 | tail -30 | tee "$OUT/gpu_tests.log" ;;
    kernels) timeout 420 python3 -m pytest -q tests/test_triton_kernels.py 2>&1 | tail -20 | tee "$OUT/kernels.log" ;;
    experts) timeout 240 python3 benchmarks/bench_mxfp4_experts.py --out "$OUT" 2>&1 | tail -40 ;;
    decode) timeout 560 python3 benchmarks/bench_decode.py --out "$OUT" 2>&1 | tail -60 ;;
    dflash) timeout 300 python3 benchmarks/bench_dflash.py --out "$OUT" 2>&1 | tail -30 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
