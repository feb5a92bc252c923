#!/usr/bin/env bash
# Session 15, call 2 (H100): the graph tests; the small preset's graphed step alone after the node-bias gathers
# moved to an embedding's backward; Amazon Sports through the CLI with the plain default command (CUDA graphs
# now the default), 3 seeds sharing the GPU, the SASRec-style baseline from session 12's cache; last, why the
# tiny MoE model's step did not capture (anomaly mode names the forward).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 80 python -m pytest -q tests/test_train_graphs.py > $R/tests.log 2>&1; tail -6 $R/tests.log
timeout 50 python benchmarks/profile_train_step.py $D $R --presets small --modes graph --steps 200 > $R/profile.jsonl 2> $R/profile.err
cat $R/profile.jsonl
timeout 420 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports > $R/default.log 2>&1
tail -14 $R/default.log
grep -h "transition mixture\|best:\|recipe small" $R/default/seed*/train.log | tail -12
timeout 30 python benchmarks/results/h100-2026-12-07-s15/call2/diag_moe.py > $R/diag_moe.log 2>&1; grep -v "^  warnings\|UserWarning" $R/diag_moe.log | tail -30
find $R -name "*.pt" -delete
cd $OUT && tar czf res.tgz res && rm -rf res
