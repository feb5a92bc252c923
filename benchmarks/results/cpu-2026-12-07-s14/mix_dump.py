"""Dump OneRec beam-128 items + log-probs for a user subset of valid/test (CPU model of session 13)."""
import numpy as np, torch, sys
from onerec_fast.data import BatchConfig
from onerec_fast.data.sources import load_source
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.cli_common import model_from_checkpoint
from onerec_fast.train.pipeline import datasets_for
torch.set_num_threads(2)
model = model_from_checkpoint(load_checkpoint(sys.argv[1])).eval()
cfg = model.cfg
log, _ = load_source(sys.argv[4] if len(sys.argv) > 4 else "scratch/data/sports.txt")
bc = BatchConfig(short_len=cfg.short_len, positive_len=cfg.pos_len, lifelong_len=cfg.lifelong_len)
dss = datasets_for(log, model.item_codes.cpu(), None, bc, ("valid", "test"))
rng = np.random.default_rng(0)
out = {}
for split, ds in dss.items():
    idx = np.sort(rng.choice(len(ds), min(len(ds), int(sys.argv[3])), replace=False))
    items, scores, users, targets = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(idx), 256):
            ch = idx[i:i + 256]
            b = ds.batch(ch)
            o = model.generate(b, beam_size=128, num_return=128)
            items.append(o.item_ids); scores.append(o.scores); targets.append(b.target_item)
            users.append(torch.from_numpy(ds.sample_user[ch])); print(split, i, flush=True)
    out[split] = dict(items=torch.cat(items), scores=torch.cat(scores), users=torch.cat(users), targets=torch.cat(targets),
                      pos=torch.from_numpy(ds.sample_pos[idx]))
out["log_item"] = torch.from_numpy(log.item.astype(np.int64)); out["offsets"] = torch.from_numpy(np.asarray(log.user_offsets()).astype(np.int64))
torch.save(out, sys.argv[2])
