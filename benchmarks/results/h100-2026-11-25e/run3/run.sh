#!/bin/bash
# Session 32, run 3: same-start whole-step profiles (profile_megakernel.py, mini, context 256, one row, medians of 5)
# of main before (HEAD~N: the commit given as $1) and after the rows_break and weights_in_smem changes, bf16 and MXFP4.
# From the repository root on the device:  bash benchmarks/results/h100-2026-11-25e/run3/run.sh BASE_COMMIT_TREE_DIR
set -e
out=${OUT:-out}/w
mkdir -p $out
base=$1  # a directory holding the base commit's tree (git archive), shipped with the working tree
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh $base /tmp/pkg_base
bash benchmarks/results/h100-2026-11-25c/mkpkg.sh . /tmp/pkg_new
pip uninstall -y tilec > /tmp/uninstall.log 2>&1 || true
start=$(date +%s)
for v in "base" "new" "new --mxfp4" "base --mxfp4" "base"; do
  set -- $v; name=$1${2:+_mx}
  echo "=== $v $(date +%T)" >> $out/profiles.txt
  python3 /tmp/pkg_$1/benchmarks/profile_megakernel.py --out /tmp/p_$name $2 --repeats 5 > /tmp/log_$name 2>&1 || true
  head -12 /tmp/log_$name >> $out/profiles.txt
  cp /tmp/log_$name $out/log_$name.txt
  echo "elapsed $(( $(date +%s) - start ))" >> $out/profiles.txt
  if [ $(( $(date +%s) - start )) -gt 440 ]; then break; fi
done
