#!/bin/bash
# Session 30 run2: same-start profiles of flat package copies (no install): A = 47ba66a, B = one-phase attention,
# then Nsight Compute stall samples of B, then V1 = B with the attention call skipped at run time (code present).
mkdir -p $OUT/w
pip uninstall -y tilec > /tmp/uninstall.log 2>&1
start=$(date +%s)
prof() {
  name=$1
  echo "=== $name $(date +%T)" >> $OUT/w/profiles.txt
  python3 .scratch/pkg_$name/benchmarks/profile_megakernel.py --out /tmp/p_$name --repeats 5 > /tmp/log_$name 2>&1
  head -16 /tmp/log_$name >> $OUT/w/profiles.txt; tail -3 /tmp/log_$name >> $OUT/w/profiles.txt
  cp /tmp/p_$name/profile_megakernel.json $OUT/w/profile_$name.json 2>/dev/null
}
prof A; prof B
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 230 $NCU --kernel-name tilec_megakernel --launch-skip 2 --launch-count 2 --section SourceCounters \
  --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,group:smsp__pcsamp_warp_stall_reasons_not_issued \
  -o /tmp/rep -f python3 .scratch/pkg_B/benchmarks/ncu_megakernel.py --steps 5 --cubin /tmp/B.cubin > /tmp/ncu.log 2>&1
echo "ncu rc=$? $(( $(date +%s) - start ))s" >> $OUT/w/profiles.txt
$NCU -i /tmp/rep.ncu-rep --page source --csv --print-source sass | gzip > $OUT/w/source_B.csv.gz
gzip -c /tmp/B.cubin > $OUT/w/B.cubin.gz
tail -3 /tmp/ncu.log >> $OUT/w/profiles.txt
[ $(( $(date +%s) - start )) -lt 480 ] && prof V1
echo "elapsed $(( $(date +%s) - start ))" >> $OUT/w/profiles.txt
