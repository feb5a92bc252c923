"""Level temperatures at inference: logits of code level t divided by T[t] before the (trie-normalized) softmax."""
import json, sys, time, torch
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.evaluate import evaluate_onerec
from onerec_fast.train.pipeline import prepare
torch.set_num_threads(2)
data, ckpt = sys.argv[1], sys.argv[2]
prep = prepare(data, seed=0, short_len=20, positive_len=50, lifelong_len=1000, splits=("train", "valid", "test"), verbose=False)
ds = prep.datasets["train"]
cfg = OneRecConfig.preset("small", short_len=20, pos_len=50, lifelong_len=1000,
                          **features_from_dataset(ds, prep.item_codes, use_user_id=False))
model = OneRec(cfg, prep.item_codes)
model.load_state_dict(load_checkpoint(ckpt)["model"]); model.eval()
orig = model.decoder.step
T = [1.0] * 4
def step(*a, **k):
    out = orig(*a, **k)
    return out / T[a[1]]
model.decoder.step = step
for temps in ([1, 1, 1, 1], [1.5, 1, 1, 1], [1.5, 1.5, 1, 1], [2, 2, 1, 1], [1, 1.5, 1, 1], [0.8, 0.8, 1, 1], [1, 1, 0.7, 0.7]):
    T[:] = temps
    r = {s: evaluate_onerec(model, prep.datasets[s], ks=(10,), beam_size=128, batch_size=256, show_progress=False)
         for s in ("valid", "test")}
    print(json.dumps({"T": temps, **{f"{s}/{m}": round(v[m], 4) for s, v in r.items() for m in ("recall@10", "ndcg@10")}}), flush=True)
