#!/usr/bin/env bash
# Session 17, call 2 (call 1's test summary and profile table did not come back: $OUT returns few files, so
# this call packs its results into one archive; trimmed to the device time left).
# 1. GPU tests: the windowed attention in the model (training, generation, captured decode) and the kernel's
#    key windows.
# 2. The graphed 0.015b step, windowed attention (this tree) against HEAD (scratch/base), interleaved, and the
#    eager profile table of 0.015b with the windowed attention.
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 90 python -m pytest -q tests/test_model.py tests/test_varlen_attention.py -k "window or padded or cuda_graph" > $R/tests.log 2>&1; tail -4 $R/tests.log
P=benchmarks/profile_train_step.py
PYTHONPATH=$PWD/scratch/base timeout 60 python $P $D $R/prof_base --presets 0.015b --modes graph eager --steps 100 > $R/prof_base.jsonl 2> $R/prof_base.err; cat $R/prof_base.jsonl
timeout 60 python $P $D $R/prof_new --presets 0.015b --modes graph eager --steps 100 > $R/prof_new.jsonl 2> $R/prof_new.err; cat $R/prof_new.jsonl
find $R -name "*.pt" -delete
head -30 $R/prof_new/prof_0.015b.txt | cut -c1-58,100-135
tar -czf $OUT/res.tgz -C $OUT res && rm -rf $R
