#!/bin/bash
# Session 30 run4: G = one-phase attention, cp.async staging in the cache dtype; A = 47ba66a
# block, 4-deep loads, one instantiation), A = 47ba66a; then F's tiny fp32 and verify-row gpu tests.
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
start=$(date +%s)
prof() {
  name=$1; tag=$2
  echo "=== $name$tag $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/pkg_$name/benchmarks/profile_megakernel.py --out /tmp/p_$name$tag --repeats 5 > /tmp/log_$name$tag 2>&1
  head -14 /tmp/log_$name$tag >> $OUT/w/profiles.txt; tail -2 /tmp/log_$name$tag >> $OUT/w/profiles.txt
  cp /tmp/p_$name$tag/profile_megakernel.json $OUT/w/profile_$name$tag.json 2>/dev/null
}
prof G 1; prof A 1; prof G 2
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
timeout 200 python3 -m pytest -q -x -m gpu tests/test_megakernel.py -k "tiny_fp32 or verify_step" > $OUT/w/t.log 2>&1
echo "tests rc=$? elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
