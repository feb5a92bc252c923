#!/usr/bin/env bash
# Session 14, call 1 (H100): Amazon Sports through the CLI with the plain default command (the small recipe:
# 8 epochs, transition mixture chosen on validation), 3 seeds sharing the GPU, the SASRec-style baseline from
# session 12's cache; then seed 0's best.pt on test at every chain weight (0 = the network alone).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 510 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports > $R/default.log 2>&1
tail -14 $R/default.log
grep -h "transition mixture\|best:\|recipe small" $R/default/seed*/train.log
timeout 60 python benchmarks/diagnostics/mixture_weights.py --checkpoint $R/default/seed0/best.pt --data $D --users 8000 --weights 0 0.5 > $R/weights_seed0.txt 2>&1
cat $R/weights_seed0.txt
find $R -name "*.pt" -delete
cd $OUT && tar czf res.tgz res && rm -rf res
