#!/bin/bash
# Same start: profiles of the new build (B) and of session 28's templates (A), the decode bench with its peers, then
# Nsight Compute's stall samples of the new build if time is left.
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
start=$(date +%s)
run() {
  if [ $1 = A ]; then export TILEC_TEMPLATES=$PWD/.scratch/base/templates; else unset TILEC_TEMPLATES; fi
  echo "=== $1 $(date +%T)" >> $OUT/w/profiles.txt
  python3 benchmarks/profile_megakernel.py --out /tmp/p_$1 --repeats 5 > /tmp/log_$1 2>&1
  head -14 /tmp/log_$1 >> $OUT/w/profiles.txt
  cp /tmp/p_$1/profile_megakernel.json $OUT/w/profile_$1.json
}
run B; run A; unset TILEC_TEMPLATES
python3 benchmarks/bench_decode.py --out /tmp/bd --contexts 256 --steps 32 \
  --entries reference,triton-mxfp4,cuda,cuda-mxfp4,hf,compile --budget-s 240 --hard-limit-s 280 > $OUT/w/bench.log 2>&1
cp /tmp/bd/bench_decode.json $OUT/w/
echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
if [ $(( $(date +%s) - start )) -lt 380 ]; then
  python3 benchmarks/ncu_megakernel.py --steps 2 --cubin /tmp/B.cubin > /dev/null 2>&1
  NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 200 $NCU --kernel-name tilec_megakernel --launch-skip 2 --launch-count 2 --section SourceCounters \
    --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,group:smsp__pcsamp_warp_stall_reasons_not_issued \
    -o /tmp/rep -f python3 benchmarks/ncu_megakernel.py --steps 5 --cubin /tmp/B.cubin > /tmp/ncu.log 2>&1
  $NCU -i /tmp/rep.ncu-rep --page source --csv --print-source sass | gzip > $OUT/w/source_B.csv.gz
  cp /tmp/B.cubin $OUT/w/B.cubin
fi
