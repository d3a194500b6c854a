#!/bin/bash
# Session 32, run 6: decode beside its peers on main's final kernel (HF eager, torch.compile with CUDA graphs,
# triton, cuda; bf16 and MXFP4; the HBM floor from the measured copy bandwidth), mini, context 256.
# From the repository root on the device:  bash benchmarks/results/h100-2026-11-25e/run6/run.sh
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
python3 benchmarks/bench_decode.py --out ${OUT:-out}/w/decode --contexts 256 --budget-s 250 --hard-limit-s 280 \
  > ${OUT:-out}/w/decode.txt 2>&1
