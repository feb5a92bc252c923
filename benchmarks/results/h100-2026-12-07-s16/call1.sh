#!/usr/bin/env bash
# Session 16, call 1 (H100): GPU tests of the graphs (MoE models now captured: their layers release the last
# forward's routing after the backward) and of the new RMSNorm op, memcheck on the RMSNorm kernels, the
# rms_norm suite; the graphed step per preset with the norms on the reference path (the old work) and on the
# Triton op; then Amazon Sports through the CLI as quality_table.py runs it, three processes sharing the GPU,
# 40 s of training each, with --cuda-graph and without; prints each one's step_ms.
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 150 python -m pytest -q tests/test_rms_norm.py tests/test_train_graphs.py tests/test_moe.py -k "graph or release or not moe" > $R/tests.log 2>&1; tail -8 $R/tests.log
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider tests/test_rms_norm.py -k "float64 or non_finite or deterministic or empty" > $R/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -3 $R/memcheck.log
timeout 120 onerec-fast bench --suite rms_norm --out $R/bench_rms_norm > $R/bench_rms_norm.log 2>&1; tail -12 $R/bench_rms_norm.log
for norm in reference triton; do
  ONEREC_FAST_BACKEND_RMS_NORM=$norm timeout 100 python benchmarks/profile_train_step.py $D $R/prof_$norm --presets small 0.015b --modes graph --steps 100 > $R/prof_$norm.jsonl 2> $R/prof_$norm.err
  echo "norm=$norm"; cat $R/prof_$norm.jsonl; tail -2 $R/prof_$norm.err
done
for mode in graph eager; do
  flag=""; [ $mode = graph ] && flag="--cuda-graph"
  for s in 0 1 2; do
    timeout 110 onerec-fast train --data $D --out $R/$mode$s --seed $s --time-budget 40 --eval-every 0 --no-transition-mixture $flag \
      > $R/train_$mode$s.log 2>&1 &
  done
  wait
  for s in 0 1 2; do echo "$mode seed $s"; grep -o '"step": [0-9]*\|"step_ms": [0-9.]*' $R/$mode$s/metrics.jsonl | paste - - | tail -3; grep -i "warn\|error\|graph" $R/train_$mode$s.log | tail -3; done
done
find $R -name "*.pt" -delete
