#!/usr/bin/env bash
# Session 16, call 2 (the session's last device seconds): Amazon Sports through the CLI with the plain default
# command, which now replays the training step from CUDA graphs and runs the Triton RMSNorm: 3 seeds sharing
# the GPU, the SASRec-style baseline from session 12's cache; then, in what time is left, the RMSNorm tests after
# the backward became persistent (a few programs per SM) and the rms_norm suite (eager and graph-replayed).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 330 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports > $R/default.log 2>&1
tail -14 $R/default.log
grep -h "transition mixture\|best:\|recipe small\|graph" $R/default/seed*/train.log | tail -12
for s in 0 1 2; do grep -o '"step_ms": [0-9.]*' $R/default/seed$s/metrics.jsonl | tail -2 | paste - -; tail -c 600 $R/default/seed$s/eval.json 2>/dev/null; echo; done
find $R -name "*.pt" -delete
timeout 30 python -m pytest -q -x tests/test_rms_norm.py > $R/tests.log 2>&1; tail -2 $R/tests.log
timeout 70 onerec-fast bench --suite rms_norm --out $R/bench_rms_norm > $R/bench_rms_norm.log 2>&1; grep "^rms_norm" $R/bench_rms_norm.log | tail -30
