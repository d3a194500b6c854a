#!/bin/bash
# Session 30 run5: every gpu test of the megakernel on f1ff1de (tiny fp32 first: a fault poisons the rest).
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
timeout 560 python3 -m pytest -q -m gpu tests/test_megakernel.py > $OUT/w/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/w/gpu_tests.log
