#!/bin/bash
# Session 30 run1: correctness of the one-phase attention (tiny fp32, verify rows), then same-start profiles:
# B = working tree (attention one phase, kv_append in the next op's interval), A = 47ba66a, B2 = B with a barrier
# after kv_append.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
start=$(date +%s)
timeout 240 python3 -m pytest -q -x -m gpu tests/test_megakernel.py -k "tiny_fp32 or verify_step" > $OUT/w/t1.log 2>&1
echo "tests rc=$? $(( $(date +%s) - start ))s" >> $OUT/w/profiles.txt
prof() {
  name=$1; shift
  echo "=== $name $(date +%T)" >> $OUT/w/profiles.txt
  env "$@" python3 benchmarks/profile_megakernel.py --out /tmp/p_$name --repeats 5 > /tmp/log_$name 2>&1
  head -16 /tmp/log_$name >> $OUT/w/profiles.txt
  cp /tmp/p_$name/profile_megakernel.json $OUT/w/profile_$name.json 2>/dev/null
}
prof B X=1
prof A PYTHONPATH=$PWD/.scratch/A TILEC_TEMPLATES=$PWD/.scratch/A/templates
prof B2 PYTHONPATH=$PWD/.scratch/B2
[ $(( $(date +%s) - start )) -lt 420 ] && prof B_again X=1
echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
