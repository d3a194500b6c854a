#!/bin/bash
# Token agreement with the reference: the new build (B) and session 28's templates (A), one start.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
for v in B A; do
  if [ $v = A ]; then export TILEC_TEMPLATES=$PWD/.scratch/base/templates; else unset TILEC_TEMPLATES; fi
  python3 benchmarks/bench_decode.py --out /tmp/bd_$v --contexts 256 --steps 16 --entries reference,cuda \
    --budget-s 200 --hard-limit-s 240 > $OUT/w/bench_$v.log 2>&1
  cp /tmp/bd_$v/bench_decode.json $OUT/w/bench_decode_$v.json
  echo "== $v"; grep -A4 "^entry" $OUT/w/bench_$v.log
done
