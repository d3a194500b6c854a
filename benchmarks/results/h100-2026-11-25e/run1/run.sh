#!/bin/bash
# Prepared by session 31 (no device time was left to run it): a same-start A/B of main against main with each patch
# in this folder, bf16 step profiles (profile_megakernel.py, mini, context 256, one row, medians of 5 steps).
# From the repository root, on the device:  bash benchmarks/results/h100-2026-11-25d/next/ab.sh
# `DRY=1` builds the packages and renders each megakernel on the meta device, without a GPU.
set -e
here=benchmarks/results/h100-2026-11-25d/next
out=${OUT:-out}/w
mkdir -p $out
build() {  # build NAME [PATCH]: a flat copy of the package (h100-2026-11-25c/mkpkg.sh), PATCH applied first
  rm -rf /tmp/src_$1 && mkdir -p /tmp/src_$1
  tar --exclude=./.scratch --exclude=./.git -cf - . | tar -xf - -C /tmp/src_$1
  if [ -n "$2" ]; then (cd /tmp/src_$1 && patch -s -p1 < $OLDPWD/$here/$2); fi
  bash benchmarks/results/h100-2026-11-25c/mkpkg.sh /tmp/src_$1 /tmp/pkg_$1
}
build main; build rows rows_break.patch; build ws weights_in_smem.patch; build merge merge.patch
if [ -n "$DRY" ]; then
  for v in main rows ws merge; do
    python3 -c "
import sys; sys.path.insert(0, '/tmp/pkg_$v')
import torch, tilec
from tilec.models import build_model
cm = tilec.compile(build_model('mini', device='meta', dtype=torch.bfloat16), target='cuda')
src = cm.program.sources['megakernel.cu']
print('$v', tilec.__file__, len(src), src.count('Ws['), src.count('>= R) break'), src.count('cp_async4('))"
  done
  exit 0
fi
pip uninstall -y tilec > /tmp/uninstall.log 2>&1 || true
start=$(date +%s)
for v in main rows ws merge main; do
  echo "=== $v $(date +%T)" >> $out/profiles.txt
  python3 /tmp/pkg_$v/benchmarks/profile_megakernel.py --out /tmp/p_$v --repeats 5 > /tmp/log_$v 2>&1
  head -12 /tmp/log_$v >> $out/profiles.txt
  cp /tmp/log_$v $out/log_$v.txt
  echo "elapsed $(( $(date +%s) - start ))" >> $out/profiles.txt
  if [ $(( $(date +%s) - start )) -gt 470 ]; then break; fi
done
