#!/bin/bash
# Session 30 run8: I = G with D and DV as template parameters and the merge 2 chunks at a time (fewer registers:
# no spills in the MXFP4 experts' loops under nvcc 13.0), against A = 47ba66a, bf16 and MXFP4, one start; then I's
# tiny fp32 and verify-row gpu tests.
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
start=$(date +%s)
prof() {
  name=$1; shift
  echo "=== $name $* $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/pkg_$name/benchmarks/profile_megakernel.py "$@" --out /tmp/p_$name$1 --repeats 5 > /tmp/log 2>&1
  head -12 /tmp/log >> $OUT/w/profiles.txt
  cp /tmp/p_$name$1/profile_megakernel.json $OUT/w/profile_$name${1#--}.json
}
prof I --mxfp4; prof A --mxfp4; prof I --rows 1; prof A --rows 1
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
timeout 150 python3 -m pytest -q -x -m gpu tests/test_megakernel.py -k "tiny_fp32 or verify_step" > $OUT/w/t.log 2>&1
echo "tests rc=$? elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
