#!/usr/bin/env bash
# Session 13, call 2 (H100): Sports through the CLI at the new default (transition biases + count prior, the
# `small` recipe), 3 seeds and nothing else on the GPU (the SASRec-style baseline from session 12's cache).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
timeout 570 python benchmarks/quality_table.py --data scratch/data/sports.txt --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports -- --time-budget 300 > $R/default.log 2>&1
tail -12 $R/default.log
for s in 0 1 2; do tail -2 $R/default/seed$s/train.log; done
find $R -name "*.pt" -delete
cd $OUT && tar czf res.tgz res && rm -rf res
