#!/bin/bash
# Session 31 run4: same start, MXFP4 profiles of B (d900ce2) and A (9dbf96f); then decode beside its peers on B.
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
start=$(date +%s)
prof() {
  name=$1; shift
  echo "=== $name $* $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/s31/pkg_$name/benchmarks/profile_megakernel.py "$@" --out /tmp/p_$name$1 --repeats 5 > /tmp/log_$name$1 2>&1
  head -12 /tmp/log_$name$1 >> $OUT/w/profiles.txt
  cp /tmp/log_$name$1 $OUT/w/log_$name${1#--}.txt
  cp /tmp/p_$name$1/profile_megakernel.json $OUT/w/profile_$name${1#--}.json
  echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
}
prof B --mxfp4; prof A --mxfp4
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
python3 benchmarks/bench_decode.py --out $OUT/w/decode --contexts 256 --budget-s 250 --hard-limit-s 280 > $OUT/w/decode.txt 2>&1
echo "decode done $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
