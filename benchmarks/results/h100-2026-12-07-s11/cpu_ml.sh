#!/bin/bash
# ML-100K: tokenizer on SASRec item vectors vs the default, seed 0, ~1 epoch each, two at once.
cd /work/main && . .venv/bin/activate
D=scratch/data/ml-100k; O=/tmp/s11/ml
mkdir -p $O
OMP_NUM_THREADS=2 python scratch/sasrec_emb.py $D 0 $O/sas0.npy > $O/sas0.json 2>$O/sas0.err
V="--data $D --preset small --no-uid --lifelong-len 1000 --train {\"lr\":2e-3} --time-budget 1200 --threads 1 --beam 128 --out $O/runs"
python benchmarks/quality_variants.py $V --name def > $O/def.jsonl 2>$O/def.err &
python benchmarks/quality_variants.py $V --name tokSAS --item-vectors $O/sas0.npy > $O/toksas.jsonl 2>$O/toksas.err &
wait
echo done > $O/DONE
