#!/bin/bash
# Session 32, run 7: the MXFP4 experts' gate/up phase with 2 columns a warp (MXFP4_GATE_UP_COLUMNS, this tree) against
# one (the commit before it, shipped as .scratch/base): same-start MXFP4 step profiles (mini, context 256, one row,
# medians of 5), then gpu tests: mini MXFP4 against fp32, drawn configurations (MXFP4 among them), verify steps.
# From the repository root on the device:  bash benchmarks/results/h100-2026-11-25e/run7/run.sh
out=${OUT:-out}/w
mkdir -p $out
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh .scratch/base /tmp/pkg_base
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh . /tmp/pkg_new
pip uninstall -y tilec > /tmp/uninstall.log 2>&1 || true
start=$(date +%s)
for v in new base new base; do
  echo "=== $v mxfp4 $(date +%T)" >> $out/profiles.txt
  python3 /tmp/pkg_$v/benchmarks/profile_megakernel.py --mxfp4 --out /tmp/p_$v --repeats 5 > /tmp/log_$v 2>&1
  head -12 /tmp/log_$v >> $out/profiles.txt
  echo "elapsed $(( $(date +%s) - start ))" >> $out/profiles.txt
done
pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
left=$(( 580 - ($(date +%s) - start) ))
timeout $left python3 -m pytest -m gpu -q "tests/test_megakernel.py::test_mini_bf16_megakernel_as_close_to_fp32_as_the_reference[True]" \
  2>&1 | tail -5 > $out/gpu_mini.log
left=$(( 580 - ($(date +%s) - start) ))
timeout $left python3 -m pytest -m gpu -q tests/test_megakernel.py -k "drawn_configs_megakernel_equals or verify" 2>&1 \
  | tail -15 > $out/gpu.log
