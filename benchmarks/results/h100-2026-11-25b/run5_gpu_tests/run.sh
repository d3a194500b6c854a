#!/bin/bash
mkdir -p $OUT/w
pip install -q --no-deps --no-build-isolation -e . > $OUT/w/install.log 2>&1
if timeout 200 python3 -m pytest -m gpu -q tests/test_megakernel.py -k tiny_fp32 > $OUT/w/tiny.log 2>&1; then
  echo "tiny passed"; timeout 480 python3 -m pytest -m gpu -q tests/test_megakernel.py -k "not tiny_fp32" 2>&1 | tee $OUT/w/gpu_megakernel.log | tail -12
else
  tail -30 $OUT/w/tiny.log
  SAN=$(which compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  timeout 300 $SAN --tool memcheck --show-backtrace device python3 -m pytest -m gpu -q tests/test_megakernel.py -k tiny_fp32 > $OUT/w/san.log 2>&1
  grep -m5 -A12 "Invalid\|Error" $OUT/w/san.log
fi
