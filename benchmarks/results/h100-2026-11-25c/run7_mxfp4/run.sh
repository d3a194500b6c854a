#!/bin/bash
# Session 30 run7: same-start MXFP4 profiles, G (f1ff1de) then A (47ba66a), flat package copies.
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
for name in G A; do
  echo "=== $name mxfp4 $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/pkg_$name/benchmarks/profile_megakernel.py --mxfp4 --out /tmp/p_$name --repeats 5 > /tmp/log_$name 2>&1
  head -14 /tmp/log_$name >> $OUT/w/profiles.txt
  cp /tmp/p_$name/profile_megakernel.json $OUT/w/profile_mxfp4_$name.json
done
