#!/bin/bash
# Sports, seed 0 (+ tokSAS seed 1): default vs node_bias off vs tokenizer on SASRec item vectors.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1
export ONEREC_FAST_NO_CUDA=1
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
D=scratch/data/sports.txt; B=${B:-270}
V="--data $D --preset small --no-uid --lifelong-len 1000 --epochs 40 --train {\"lr\":2e-3} --time-budget $B --beam 128 --out /root/runs"
python scratch/sasrec_emb.py $D 0 /root/sas0.npy 60 > $OUT/sas0.json 2>$OUT/sas0.err &
P0=$!
python scratch/sasrec_emb.py $D 1 /root/sas1.npy 60 > $OUT/sas1.json 2>$OUT/sas1.err &
P1=$!
python benchmarks/quality_variants.py $V --name S_def > $OUT/S_def.jsonl 2>$OUT/S_def.err &
python benchmarks/quality_variants.py $V --name S_nobias --model '{"node_bias":false}' > $OUT/S_nobias.jsonl 2>$OUT/S_nobias.err &
wait $P0; echo "sas0 done $(el)" >> $OUT/times.txt
python benchmarks/quality_variants.py $V --name S_tokSAS0 --item-vectors /root/sas0.npy > $OUT/S_tokSAS0.jsonl 2>$OUT/S_tokSAS0.err &
wait $P1; echo "sas1 done $(el)" >> $OUT/times.txt
python benchmarks/quality_variants.py $V --seed 1 --name S_tokSAS1 --item-vectors /root/sas1.npy > $OUT/S_tokSAS1.jsonl 2>$OUT/S_tokSAS1.err &
wait; echo "all done $(el)" >> $OUT/times.txt
cp /root/sas0.npy /root/sas1.npy $OUT/ 2>/dev/null
