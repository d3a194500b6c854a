#!/bin/bash
# Session 32, run 5: as run 4, the merge's copies as one run where the block has every row (nr == Q)
# (shipped as .scratch/base): same-start bf16 step profiles (mini, context 256, one row, medians of 5), then the
# megakernel's gpu tests of the merge paths and the tiny and verify-step checks.
# From the repository root on the device:  bash benchmarks/results/h100-2026-11-25e/run4/run.sh
out=${OUT:-out}/w
mkdir -p $out
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh .scratch/base /tmp/pkg_base
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh . /tmp/pkg_new
pip uninstall -y tilec > /tmp/uninstall.log 2>&1 || true
start=$(date +%s)
for v in base new base new; do
  echo "=== $v $(date +%T)" >> $out/profiles.txt
  python3 /tmp/pkg_$v/benchmarks/profile_megakernel.py --out /tmp/p_$v --repeats 5 > /tmp/log_$v 2>&1
  head -12 /tmp/log_$v >> $out/profiles.txt
  echo "elapsed $(( $(date +%s) - start ))" >> $out/profiles.txt
done
pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
left=$(( 585 - ($(date +%s) - start) ))
timeout $left python3 -m pytest -m gpu -q tests/test_megakernel.py -k "variants or verify" 2>&1 | tail -15 > $out/gpu.log
