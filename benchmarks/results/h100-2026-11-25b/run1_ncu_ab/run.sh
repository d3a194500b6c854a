#!/bin/bash
# A/B under Nsight Compute: main's templates (a) and .scratch/v1's (b, attention merge NB = 4).
set -x
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" > $OUT/w/log.txt
for v in a b; do
  if [ $v = b ]; then export TILEC_TEMPLATES=$PWD/.scratch/v1/templates; fi
  python3 benchmarks/ncu_megakernel.py --steps 2 --cubin /tmp/$v.cubin >> $OUT/w/log.txt 2>&1  # compile outside ncu
  $NCU --kernel-name tilec_megakernel --launch-skip 2 --launch-count 2 --section SourceCounters \
    --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,group:smsp__pcsamp_warp_stall_reasons_not_issued \
    -o /tmp/rep_$v -f python3 benchmarks/ncu_megakernel.py --steps 5 --cubin /tmp/$v.cubin >> $OUT/w/log.txt 2>&1
  $NCU -i /tmp/rep_$v.ncu-rep --page source --csv --print-source sass | gzip > $OUT/w/source_$v.csv.gz
  $NCU -i /tmp/rep_$v.ncu-rep --page details --csv > $OUT/w/details_$v.csv 2>&1
  cp /tmp/$v.cubin $OUT/w/$v.cubin
  python3 benchmarks/ncu_stalls.py $OUT/w/source_$v.csv.gz --cubin /tmp/$v.cubin --top 40 >> $OUT/w/stalls.txt 2>&1
done
ls -la $OUT/w
