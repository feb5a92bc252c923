#!/usr/bin/env bash
# Session 16, call 2 (the session's last device seconds, after many refused starts): Amazon Sports through the
# CLI with the plain default command, which now replays the training step from CUDA graphs and runs the Triton
# RMSNorm: seed 0 alone on the GPU (three seeds did not fit in the device time left), the SASRec-style baseline
# from session 12's cache; then, in what time is left, the RMSNorm tests after the backward became persistent.
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 250 python benchmarks/quality_table.py --data $D --seeds 0 --out $R/default --tiger sports > $R/default.log 2>&1
tail -10 $R/default.log
grep -h "transition mixture\|best:\|recipe small\|graph" $R/default/seed*/train.log | tail -8
grep -o '"step_ms": [0-9.]*' $R/default/seed0/metrics.jsonl | tail -3 | paste - - -; tail -c 600 $R/default/seed0/eval.json 2>/dev/null; echo
find $R -name "*.pt" -delete
timeout 30 python -m pytest -q -x tests/test_rms_norm.py > $R/tests.log 2>&1; tail -2 $R/tests.log
