#!/usr/bin/env bash
# Session 13, call 1 (H100): Sports through the CLI with the leave-one-out transition prior (3 seeds, the
# SASRec-style baseline from session 12's cache), and at the same time five library runs (the default and four variants)
# default (seed 0); then the CUDA-graph decode tests (correctness only: the GPU is shared).
source benchmarks/results/h100-2026-12-07-s13/setup.sh
D=scratch/data/sports.txt
timeout 560 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/prior --tiger sports -- --time-budget 300 --transition-prior > $R/prior.log 2>&1 &
V="python benchmarks/quality_variants.py --data $D --preset small --no-uid --lifelong-len 1000 --epochs 40 --train {\"lr\":2e-3} --time-budget 300 --beam 128 --out $R/var"
timeout 560 $V --name default --model '{"transition_window":3}' > $R/v_default.jsonl 2> $R/v_default.err &
timeout 560 $V --name idw128 --model '{"transition_window":3,"d_feat":128}' > $R/v_idw128.jsonl 2> $R/v_idw128.err &
timeout 560 $V --name idw128c32 --model '{"transition_window":3,"d_feat":128,"d_code":32}' > $R/v_idw128c32.jsonl 2> $R/v_idw128c32.err &
timeout 560 $V --name w5 --model '{"transition_window":5}' > $R/v_w5.jsonl 2> $R/v_w5.err &
timeout 560 $V --name drop3 --model '{"transition_window":3,"dropout":0.3}' > $R/v_drop3.jsonl 2> $R/v_drop3.err &
sleep 20
timeout 200 python -m pytest -q -x tests/test_model.py tests/test_beam_search.py -k cuda_graph > $R/graph_tests.txt 2>&1
wait
tail -5 $R/graph_tests.txt
cat $R/prior.log | tail -12
for f in $R/v_*.jsonl; do tail -1 $f; done
find $R -name "*.pt" -delete
cd $OUT && tar czf res.tgz res && rm -rf res
