# working tree: main (5343fc6) + ../h100-2026-11-25e/next/no_allocate.patch; .scratch/base = git archive 5343fc6
pip uninstall -y tilec
python3 benchmarks/ab_megakernel.py --tree base=.scratch/base --tree new=. --order new,base,new,base --guard-s 440 --out $OUT/w
