#!/usr/bin/env bash
# Sports: transition biases (3 seeds) against the default (seed 0) through the CLI, same run.
set -u
export ONEREC_FAST_CACHE_DIR=$PWD/scratch/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv > $OUT/env.txt
ONEREC_FAST_NO_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/env.txt
D=scratch/data/sports.txt
R=$OUT/res; mkdir -p $R
timeout 560 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/trans --tiger sports -- --time-budget 300 --transition-window 3 > $R/trans.log 2>&1 &
timeout 560 python benchmarks/quality_table.py --data $D --seeds 0 --out $R/default --tiger sports -- --time-budget 300 > $R/default.log 2>&1 &
wait
cp -r scratch/cache $R/cache
cat $R/trans.log $R/default.log | tail -40
tail -3 $R/*/seed*/train.log
cd $OUT && tar czf res.tgz res && rm -rf res
