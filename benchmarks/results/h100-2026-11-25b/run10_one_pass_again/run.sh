#!/bin/bash
# Same start: the current kernel (B) against it + session 28's attention_one_pass.patch (P), then P's tiny exact test.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
run() {
  if [ $1 = P ]; then export TILEC_TEMPLATES=$PWD/.scratch/onepass/templates; else unset TILEC_TEMPLATES; fi
  echo "=== $1 $(date +%T)" >> $OUT/w/profiles.txt
  python3 benchmarks/profile_megakernel.py --out /tmp/p_$1 --repeats 5 > /tmp/log_$1 2>&1
  head -14 /tmp/log_$1 >> $OUT/w/profiles.txt
  cp /tmp/p_$1/profile_megakernel.json $OUT/w/profile_$1.json
}
run P; run B
export TILEC_TEMPLATES=$PWD/.scratch/onepass/templates
timeout 150 python3 -m pytest -m gpu -q tests/test_megakernel.py -k tiny_fp32 > $OUT/w/tiny_P.log 2>&1; tail -1 $OUT/w/tiny_P.log
