#!/bin/bash
# Session 31 run2: the instruction-cache probe, then Nsight Compute of HEAD's bf16 megakernel (stalls by function and
# each function's executed code).
mkdir -p $OUT/w
start=$(date +%s)
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
python3 benchmarks/icache_probe.py --out $OUT/w/icache > $OUT/w/icache.txt 2>&1
echo "icache done $(( $(date +%s) - start ))" >> $OUT/w/times.txt
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
python3 benchmarks/ncu_megakernel.py --steps 2 --cubin /tmp/h.cubin > $OUT/w/ncu_log.txt 2>&1
timeout 400 $NCU --kernel-name tilec_megakernel --launch-skip 2 --launch-count 2 --section SourceCounters \
  --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,group:smsp__pcsamp_warp_stall_reasons_not_issued \
  -o /tmp/rep_h -f python3 benchmarks/ncu_megakernel.py --steps 5 --cubin /tmp/h.cubin >> $OUT/w/ncu_log.txt 2>&1
$NCU -i /tmp/rep_h.ncu-rep --page source --csv --print-source sass | gzip > $OUT/w/source_h.csv.gz
cp /tmp/h.cubin $OUT/w/h.cubin
echo "ncu done $(( $(date +%s) - start ))" >> $OUT/w/times.txt
