#!/bin/bash
cd /work/main && . .venv/bin/activate
while [ ! -f scratch/s12/mlcli/quality.md ] && ! grep -q done scratch/s12/mlcli.log 2>/dev/null; do sleep 20; done
D=scratch/data/ml-100k; O=scratch/s12/ml; mkdir -p $O
V="--data $D --preset small --no-uid --lifelong-len 1000 --time-budget 1200 --threads 1 --beam 128 --out $O/runs --train {\"lr\":2e-3}"
python benchmarks/quality_variants.py $V --seed 0 --name TLs0 --model '{"transition_window":3,"transition_prior":true}' > $O/TLs0.jsonl 2>$O/TLs0.err &
python benchmarks/quality_variants.py $V --seed 1 --name TLs1 --model '{"transition_window":3,"transition_prior":true}' > $O/TLs1.jsonl 2>$O/TLs1.err &
wait; echo done > $O/DONE_LOO
