#!/bin/bash
# Same-start profiles: A = HEAD's templates, C = HEAD + __syncwarp after the GEMV loads, B = the working tree.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
start=$(date +%s)
run() {
  if [ $1 = A ]; then export TILEC_TEMPLATES=$PWD/.scratch/base/templates
  elif [ $1 = C ]; then export TILEC_TEMPLATES=$PWD/.scratch/sw/templates; else unset TILEC_TEMPLATES; fi
  echo "=== $1 $2 $(date +%T)" >> $OUT/w/profiles.txt
  python3 benchmarks/profile_megakernel.py --out /tmp/p_$1_$2 --repeats 5 > /tmp/log_$1$2 2>&1
  head -14 /tmp/log_$1$2 >> $OUT/w/profiles.txt
  cp /tmp/p_$1_$2/profile_megakernel.json $OUT/w/profile_$1_$2.json
}
run A 1; run C 1; run B 1
if [ $(( $(date +%s) - start )) -lt 400 ]; then run B 2; fi
if [ $(( $(date +%s) - start )) -lt 480 ]; then run A 2; fi
