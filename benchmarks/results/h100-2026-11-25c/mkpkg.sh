#!/bin/bash
# mkpkg.sh SRC DEST (the runs kept it as .scratch/mkpkg.sh): a flat copy of tilec (models, passes, runtime and
# templates inside) plus the benchmark scripts, runnable as python3 DEST/benchmarks/X.py without installing (the
# scripts put DEST first on sys.path).
set -e
src=$1; dest=$2
rm -rf $dest; mkdir -p $dest/benchmarks
cp -r $src/tilec $dest/tilec
cp -r $src/models $dest/tilec/models; cp -r $src/passes $dest/tilec/passes; cp -r $src/runtime $dest/tilec/runtime; cp -r $src/templates $dest/tilec/templates
for f in profile_megakernel.py common.py ncu_megakernel.py bench_decode.py; do cp $src/benchmarks/$f $dest/benchmarks/ 2>/dev/null || true; done
find $dest -name __pycache__ -prune -exec rm -rf {} +
