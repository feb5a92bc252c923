"""Which mixture weight do training rows (LOO Markov counts) vs valid/test rows prefer (mixture NLL)?"""
import collections, numpy as np, torch, sys, math
from onerec_fast.data import BatchConfig
from onerec_fast.data.sources import load_source
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.cli_common import model_from_checkpoint
from onerec_fast.train.pipeline import datasets_for
torch.set_num_threads(2)
model = model_from_checkpoint(load_checkpoint(sys.argv[1]))
cfg = model.cfg
log, _ = load_source(sys.argv[2])
bc = BatchConfig(short_len=cfg.short_len, positive_len=cfg.pos_len, lifelong_len=cfg.lifelong_len)
dss = datasets_for(log, model.item_codes.cpu(), None, bc, ("train", "valid", "test"))
li = log.item.astype(np.int64); off = np.asarray(log.user_offsets()).astype(np.int64)
W = 3
fwd = collections.defaultdict(collections.Counter)
for u in range(len(off) - 1):
    tr = li[off[u]:off[u + 1]][:-2]
    for p in range(len(tr)):
        for b in range(1, W + 1):
            if p - b >= 0: fwd[tr[p - b]][tr[p]] += 1
nsum = {i: sum(c.values()) for i, c in fwd.items()}
rng = np.random.default_rng(0)
for split in ("train", "valid", "test"):
  for mode in (("train", "eval") if split == "train" else ("eval",)):
    ds = dss[split]; idx = np.sort(rng.choice(len(ds), 4000, replace=False))
    model.train(mode == "train")
    lnn, mk = [], []
    with torch.no_grad():
        for i in range(0, len(idx), 256):
            ch = idx[i:i + 256]; b = ds.batch(ch)
            lp = [lg.float().masked_fill(~m, float("-inf")).log_softmax(-1) for lg, m in zip(model.code_logits(b), model.prefix_masks(b.target_codes))]
            lnn.append(sum(x.gather(1, b.target_codes[:, t:t + 1])[:, 0] for t, x in enumerate(lp)))
            for u, p, t in zip(ds.sample_user[ch], ds.sample_pos[ch], b.target_item.tolist()):
                recent = li[off[u]:off[u] + p][-W:]
                loo = 1 if split == "train" else 0
                c = sum(fwd[i][t] - loo for i in recent); n = sum(nsum.get(i, 0) - loo for i in recent)
                # own occurrences: one per slot (exact only without duplicate items; fine for a check)
                mk.append(c / n if n > 0 else 0.0)
    pn = torch.cat(lnn).exp().double(); m = torch.tensor(mk).double()
    res = {lam: round(-torch.log(lam * pn + (1 - lam) * m + 1e-300).mean().item(), 3) for lam in (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3)}
    print(split, mode, "NLL by lambda (weight of the network)", res, "markov>0", round((m > 0).double().mean().item(), 3), flush=True)
