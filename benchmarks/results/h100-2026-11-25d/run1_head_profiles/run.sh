#!/bin/bash
# Session 31 run1: HEAD (9dbf96f): the attention timeline (bf16 and MXFP4 profiles), then decode beside its peers.
mkdir -p $OUT/w
start=$(date +%s)
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
for m in "" "--mxfp4"; do
  python3 benchmarks/profile_megakernel.py $m --out /tmp/p$m --repeats 5 > $OUT/w/profile$m.txt 2>&1
  cp /tmp/p$m/profile_megakernel.json $OUT/w/profile$m.json
  echo "profile$m done $(( $(date +%s) - start ))" >> $OUT/w/times.txt
done
python3 benchmarks/bench_decode.py --out $OUT/w/decode --contexts 256 --budget-s 200 --hard-limit-s 240 > $OUT/w/decode.txt 2>&1
echo "decode done $(( $(date +%s) - start ))" >> $OUT/w/times.txt
