#!/bin/bash
# Same-start A/B of whole-step profiles: A = .scratch/base (HEAD's templates), B = the working tree's templates.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
for round in 1 2; do
  for v in A B; do
    if [ $v = A ]; then export TILEC_TEMPLATES=$PWD/.scratch/base/templates; else unset TILEC_TEMPLATES; fi
    echo "=== round $round $v $(date +%T)" >> $OUT/w/profiles.txt
    python3 benchmarks/profile_megakernel.py --out /tmp/p_${v}_$round --repeats 5 > /tmp/log_$v$round 2>&1; head -14 /tmp/log_$v$round >> $OUT/w/profiles.txt
    cp /tmp/p_${v}_$round/profile_megakernel.json $OUT/w/profile_${v}_$round.json
  done
done
unset TILEC_TEMPLATES
python3 benchmarks/ncu_megakernel.py --steps 2 --cubin $OUT/w/B.cubin >> $OUT/w/profiles.txt 2>&1
