#!/usr/bin/env bash
# Session 14, call 3 (H100): ML-100K through the CLI with the plain default command on a GPU (8 epochs, the
# chain's weight chosen on validation), 3 seeds sharing the GPU, each with its SASRec-style baseline trained
# here on the same split and seed (an empty cache); then seed 0's best.pt at every chain weight on test.
set -u
export ONEREC_FAST_CACHE_DIR=$PWD/scratch/cache_gpu PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
ONEREC_FAST_NO_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/env.txt
R=$OUT/res; mkdir -p $R
D=scratch/data/ml-100k
timeout 380 python benchmarks/quality_table.py --data $D --seeds 0 1 2 --parallel 3 --out $R/ml > $R/ml.log 2>&1
tail -12 $R/ml.log
grep -h "transition mixture\|best:\|steps of" $R/ml/seed*/train.log
timeout 45 python benchmarks/diagnostics/mixture_weights.py --checkpoint $R/ml/seed0/best.pt --data $D > $R/weights_seed0.txt 2>&1
cat $R/weights_seed0.txt
find $R -name "*.pt" -delete; rm -f $R/ml/seed*/loss.png $R/ml/seed*/metrics.csv
