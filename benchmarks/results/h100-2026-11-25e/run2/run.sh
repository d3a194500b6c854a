pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1; timeout 560 python3 -m pytest -m gpu -q tests/test_megakernel.py -x 2>&1 | tee $OUT/gpu_mk.log | tail -15
