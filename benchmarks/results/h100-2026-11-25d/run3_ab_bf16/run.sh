#!/bin/bash
# Session 31 run3: same start, bf16 profiles of A (HEAD 9dbf96f), C (attention's code diet and one-round merge, grid_sync
# out of line) and B (C with grid_sync inline); then C's gpu tests (tiny fp32, planner variants incl. merge groups,
# verify rows); then MXFP4 profiles of C and A while time is left.
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
start=$(date +%s)
prof() {
  name=$1; shift
  echo "=== $name $* $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/s31/pkg_$name/benchmarks/profile_megakernel.py "$@" --out /tmp/p_$name$1 --repeats 5 > /tmp/log_$name$1 2>&1
  head -12 /tmp/log_$name$1 >> $OUT/w/profiles.txt
  sed -n '/attention inside/,$p' /tmp/log_$name$1 >> $OUT/w/profiles.txt
  cp /tmp/log_$name$1 $OUT/w/log_$name${1#--}.txt
  cp /tmp/p_$name$1/profile_megakernel.json $OUT/w/profile_$name${1#--}.json
  echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
}
prof A --rows 1; prof C --rows 1; prof B --rows 1
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
timeout 200 python3 -m pytest -q -x -m gpu tests/test_megakernel.py -k "tiny_fp32 or planner_variants or verify_step" > $OUT/w/t.log 2>&1
echo "tests rc=$? elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
if [ $(( $(date +%s) - start )) -lt 420 ]; then prof C --mxfp4; fi
if [ $(( $(date +%s) - start )) -lt 490 ]; then prof A --mxfp4; fi
