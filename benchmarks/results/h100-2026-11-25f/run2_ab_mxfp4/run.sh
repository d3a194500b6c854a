# same trees as run1, the same machine start, right after it
pip uninstall -y tilec
python3 benchmarks/ab_megakernel.py --tree base=.scratch/base --tree new=. --order new,base,new,base --mxfp4 --guard-s 430 --out $OUT/wm
