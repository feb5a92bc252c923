#!/usr/bin/env bash
# Session 15, call 1 (H100): the graphed training step's GPU tests, then eager against graphed steps per preset
# on Amazon Sports (benchmarks/profile_train_step.py).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
timeout 200 python -m pytest -q -x tests/test_train_graphs.py > $R/tests.log 2>&1; tail -5 $R/tests.log
timeout 420 python benchmarks/profile_train_step.py scratch/data/sports.txt $R --modes eager graph graph+compile > $R/profile.jsonl 2> $R/profile.err
cat $R/profile.jsonl; tail -5 $R/profile.err
cd $OUT && tar czf res.tgz res && rm -rf res
