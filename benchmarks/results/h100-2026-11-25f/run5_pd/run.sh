# working tree: fe1309c + pd.patch (P: experts_gate_up's loads one turn ahead, dot_rows_ahead; D: f16_pair dequant)
# .scratch/base = git archive fe1309c (tilec models passes runtime templates benchmarks/profile_megakernel.py)
# A new machine start (after run1 to run4's). The device budget ran out at 482 s: the pytest was cut by its own
# timeout after its first test, and each --guard-s 100 let only the first run start (a run takes 80 to 113 s).
pip install -q --no-deps --no-build-isolation -e .
timeout 200 python3 -m pytest -m gpu -q tests/test_megakernel.py -k "mini_bf16_megakernel_as_close" | tee $OUT/gpu.log
pip uninstall -y tilec
python3 benchmarks/ab_megakernel.py --tree base=.scratch/base --tree new=. --order new,base --mxfp4 --guard-s 100 --out $OUT/wm
python3 benchmarks/ab_megakernel.py --tree base=.scratch/base --tree new=. --order new,base --guard-s 100 --out $OUT/w
