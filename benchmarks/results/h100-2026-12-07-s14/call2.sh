#!/usr/bin/env bash
# Session 14, call 2 (H100): build the extension; the CUDA-graph decode tests (the transition mixture's replay
# included) and the transition tests on the GPU; then the beam-search and varlen-attention suites (issue 15).
set -u
export PYTHONUNBUFFERED=1
G=$OUT/gpu; mkdir -p $G
STEP_TIMEOUT=150 bash benchmarks/run_gpu.sh $G build
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_model.py -k "cuda_graph or transition" > $G/graph_tests.txt 2>&1
tail -4 $G/graph_tests.txt
SUITES="beam_search" STEP_TIMEOUT=110 bash benchmarks/run_gpu.sh $G bench
SUITES="varlen_attention" STEP_TIMEOUT=250 bash benchmarks/run_gpu.sh $G bench
