#!/bin/bash
# Session 30 run6: decode beside its peers on f1ff1de (one start), then the MXFP4 megakernel's profile.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
start=$(date +%s)
python3 benchmarks/bench_decode.py --out /tmp/bd --contexts 256 --steps 32 \
  --entries reference,triton-mxfp4,cuda,cuda-mxfp4,hf,compile --budget-s 240 --hard-limit-s 280 > $OUT/w/bench.log 2>&1
cp /tmp/bd/bench_decode.json $OUT/w/
echo "bench elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
python3 benchmarks/profile_megakernel.py --mxfp4 --out /tmp/pm --repeats 5 > /tmp/pm.log 2>&1
head -14 /tmp/pm.log >> $OUT/w/profiles.txt; cp /tmp/pm/profile_megakernel.json $OUT/w/profile_mxfp4.json
python3 benchmarks/profile_megakernel.py --out /tmp/pb --repeats 5 > /tmp/pb.log 2>&1
head -14 /tmp/pb.log >> $OUT/w/profiles.txt; cp /tmp/pb/profile_megakernel.json $OUT/w/profile_bf16.json
echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
