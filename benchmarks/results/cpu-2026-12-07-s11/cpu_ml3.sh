#!/bin/bash
cd /work/main && . .venv/bin/activate
D=scratch/data/ml-100k; O=/tmp/s11/ml3; mkdir -p $O
V="--data $D --preset small --no-uid --lifelong-len 1000 --time-budget 1200 --threads 1 --beam 128 --out $O/runs --train {\"lr\":2e-3}"
python benchmarks/quality_variants.py $V --seed 0 --name T3s0 --model '{"transition_window":3}' > $O/T3s0.jsonl 2>$O/T3s0.err &
python benchmarks/quality_variants.py $V --seed 1 --name T3s1 --model '{"transition_window":3}' > $O/T3s1.jsonl 2>$O/T3s1.err &
wait; echo done > $O/DONE
