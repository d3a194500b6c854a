# the working tree of run1 (the patch applied), the same machine start
pip install -q --no-deps --no-build-isolation -e .
python3 benchmarks/bench_decode.py --contexts 256 --budget-s 250 --hard-limit-s 280 --out $OUT/decode
