# the working tree of run1 (the patch applied), the same machine start
pip install -q --no-deps --no-build-isolation -e .
python3 -m pytest -m gpu -q tests/test_megakernel.py
