# Sourced by call1.sh and call2.sh: the SASRec-style cache of session 12, the environment record, a
# Triton-only install, and the result folder $R.
set -u
export ONEREC_FAST_CACHE_DIR=$PWD/scratch/cache PYTHONUNBUFFERED=1
mkdir -p $ONEREC_FAST_CACHE_DIR/baselines && cp benchmarks/results/h100-2026-12-07-s12/sasrec_cache/*.json $ONEREC_FAST_CACHE_DIR/baselines/
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
ONEREC_FAST_NO_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/env.txt
R=$OUT/res; mkdir -p $R
