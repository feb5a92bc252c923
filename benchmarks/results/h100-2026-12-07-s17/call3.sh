#!/usr/bin/env bash
# Not run (session 17 ran out of device time): what this session left unmeasured on the GPU. Results packed into
# one archive ($OUT returns a few files only).
# 1. The windowed-attention model test after its tolerance change (and its generation half, not reached on the
#    GPU), with the graphed-step tests.
# 2. The varlen_attention suite's window self-attention cases (forward, forward+backward; FlexAttention and the
#    masked SDPA in the same run).
# 3. The RMSNorm launch-config table for this GPU (tune_rms_norm.py needs more than 60 s); copy
#    $R/rms_norm.json into kernels/configs/.
# 4. Amazon Sports with the plain default command, 3 seeds sharing the GPU (graphs, Triton RMSNorm, windowed
#    attention in evaluation).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 120 python -m pytest -q tests/test_model.py tests/test_train_graphs.py -k "window or graph" > $R/tests.log 2>&1; tail -3 $R/tests.log
timeout 150 python -m pytest -q --benchmark benchmarks/bench_varlen_attention.py -k window --bench-dir $R/bench_window > $R/bench_window.log 2>&1
grep "window" $R/bench_window.log | grep -v "^test_" | tail -12
timeout 240 python benchmarks/tune_rms_norm.py > $R/tune_rms_norm.log 2>&1; tail -4 $R/tune_rms_norm.log
cp kernels/configs/rms_norm.json $R/ 2>/dev/null
timeout 420 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/default --tiger sports > $R/default.log 2>&1
tail -12 $R/default.log
find $R -name "*.pt" -delete
tar -czf $OUT/res.tgz -C $OUT res && rm -rf $R
