"""python scratch/sasrec_emb.py DATA SEED OUT.npy [EPOCHS]: train the SASRec-style baseline (train rows, valid
selection) and save its item embeddings [I, d] (the tied input/output vectors)."""
import json, sys, time
import numpy as np, torch
from onerec_fast.data.sources import load_source
from onerec_fast.train.baselines import SASRecConfig, train_sasrec, sasrec_topk
from onerec_fast.train.evaluate import rank_metrics
data, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 200
t0 = time.time()
dev = "cuda" if torch.cuda.is_available() else "cpu"
log, _ = load_source(data)
m = train_sasrec(log, SASRecConfig(seed=seed, epochs=epochs), device=dev, show_progress=False)
np.save(out, m.item_emb.weight[1:].detach().float().cpu().numpy())
top, tgt = sasrec_topk(m, log, 10, device=dev)
print(json.dumps({"sasrec_emb": out, "valid": m.selection, "test": rank_metrics(top, tgt, (5, 10)),
                  "s": round(time.time() - t0)}), flush=True)
