#!/usr/bin/env bash
# Not run (session 16 ran out of device time): what this session left unmeasured on the GPU.
# 1. The RMSNorm GPU tests and the rms_norm suite after the backward became persistent (a few programs per SM).
# 2. The H100 table of the RMSNorm launch configs (benchmarks/tune_rms_norm.py; copy it into kernels/configs/).
# 3. Memory of eager against graphed steps (each captured shape keeps a pool): profile_train_step.py.
# 4. Amazon Sports with the plain default command (graphs, Triton RMSNorm), 3 seeds sharing the GPU.
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 120 python -m pytest -q tests/test_rms_norm.py tests/test_train_graphs.py > $R/tests.log 2>&1; tail -3 $R/tests.log
timeout 90 onerec-fast bench --suite rms_norm --out $R/bench_rms_norm > $R/bench_rms_norm.log 2>&1; grep "^rms_norm" $R/bench_rms_norm.log | tail -24
timeout 120 python benchmarks/tune_rms_norm.py > $R/tune_rms_norm.log 2>&1; tail -8 $R/tune_rms_norm.log; cp kernels/configs/rms_norm.json $R/
timeout 150 python benchmarks/profile_train_step.py $D $R/prof --presets small 0.015b --modes eager graph --steps 100 > $R/prof.jsonl 2> $R/prof.err; cat $R/prof.jsonl
timeout 360 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports > $R/default.log 2>&1
tail -12 $R/default.log
find $R -name "*.pt" -delete
