#!/usr/bin/env bash
# Session 13 (issue 16): the CUDA-graph decode against the eager one in a serving loop, alone on the GPU, after
# the full build (CUDA extension for sm_90a), and the beam-search capture test that needs the CUDA kernel.
set -u
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/env.txt
timeout 90 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo build rc=$?
python -c "from onerec_fast.backends import describe; print(describe())" >> $OUT/env.txt 2>&1
timeout 45 python -m pytest -q tests/test_beam_search.py -k cuda_graph > $OUT/graph_test.txt 2>&1; tail -2 $OUT/graph_test.txt
timeout 100 python benchmarks/bench_serving.py --batches 1,64,256 --requests 10 --warmup 2 --impls fused,fused-graph --out $OUT/serving > $OUT/serving.txt 2>&1; echo serving rc=$?
cat $OUT/env.txt; tail -15 $OUT/serving.txt
