#!/usr/bin/env bash
# Session 17, call 1.
# 1. GPU tests: RMSNorm, the graphed step, varlen attention (the new key windows), the model (windowed attention).
# 2. The encoder's self-attention at the 0.015b Sports shape, per path (enc_attn.py).
# 3. The step with the windowed attention against the same step at HEAD (scratch/base: `git archive HEAD
#    onerec_fast`, first on PYTHONPATH), graph and eager, with the eager profile table.
# 4. What session 16 left: the rms_norm suite after the persistent backward, and the RMSNorm launch-config table.
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 200 python -m pytest -q tests/test_rms_norm.py tests/test_train_graphs.py tests/test_varlen_attention.py tests/test_model.py > $R/tests.log 2>&1; tail -3 $R/tests.log
timeout 100 python benchmarks/results/h100-2026-12-07-s17/enc_attn.py > $R/enc_attn.log 2>&1; grep -v Warning $R/enc_attn.log | tail -12
timeout 130 python benchmarks/profile_train_step.py $D $R/prof_new --presets 0.015b small --modes graph eager --steps 100 > $R/prof_new.jsonl 2> $R/prof_new.err; cat $R/prof_new.jsonl
PYTHONPATH=$PWD/scratch/base timeout 80 python benchmarks/profile_train_step.py $D $R/prof_base --presets 0.015b small --modes graph --steps 100 > $R/prof_base.jsonl 2> $R/prof_base.err; cat $R/prof_base.jsonl
timeout 60 onerec-fast bench --suite rms_norm --out $R/bench_rms_norm > $R/bench_rms_norm.log 2>&1; grep "^rms_norm" $R/bench_rms_norm.log | tail -24
timeout 60 python benchmarks/tune_rms_norm.py > $R/tune_rms_norm.log 2>&1; tail -8 $R/tune_rms_norm.log; cp kernels/configs/rms_norm.json $R/
find $R -name "*.pt" -delete
