#!/usr/bin/env bash
# Session 15, call 3 (H100, the session's last device seconds): three `onerec-fast train` processes on Amazon
# Sports sharing the GPU as quality_table.py runs them, 40 s of training each, after the padding moved to numpy
# (pinned output) and gradients are unset at the start of every step; prints each one's step_ms.
export PYTHONUNBUFFERED=1
ONEREC_FAST_NO_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1
for s in 0 1 2; do
  timeout 95 onerec-fast train --data scratch/data/sports.txt --out $OUT/s$s --seed $s --time-budget 40 --eval-every 0 \
    --no-transition-mixture > $OUT/train$s.log 2>&1 &
done
wait
for s in 0 1 2; do grep -o '"step": [0-9]*\|"step_ms": [0-9.]*' $OUT/s$s/metrics.jsonl | paste - - | tail -4; tail -2 $OUT/train$s.log; done
find $OUT -name "*.pt" -delete
