import sys, time, numpy as np, torch
sys.path.insert(0, "benchmarks/diagnostics")
from code_predictability import bigram_cross_entropy, prefix_ids
from onerec_fast.data.sources import load_source
from onerec_fast.tokenizer import fuse_item_embeddings
from onerec_fast.tokenizer.fusion import mean_over_neighbours
from onerec_fast.train.baselines import train_counts, train_rows
from onerec_fast.train.pipeline import item_codes_for
torch.set_num_threads(2)
log, _ = load_source(sys.argv[1]); log.sort_()
counts = train_counts(log)
train = train_rows(log)
pair = (log.user[1:] == log.user[:-1]) & train[1:] & train[:-1]
ts, td = log.item[:-1][pair], log.item[1:][pair]
end = log.user_offsets()[1:][np.diff(log.user_offsets()) >= 3]
src, dst = log.item[end - 2], log.item[end - 1]
buckets = {"<=5": counts[dst] <= 5, "6-20": (counts[dst] > 5) & (counts[dst] <= 20), ">50": counts[dst] > 50}
emb, _ = fuse_item_embeddings(log, dim=64, seed=0)
unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
I = log.num_items
def pred_mean(x, succ=False):
    a, b = (td, ts) if not succ else (ts, td)
    u = unit(x.double())
    out = torch.zeros_like(u).index_add_(0, torch.from_numpy(a), u[torch.from_numpy(b)])
    deg = torch.bincount(torch.from_numpy(a), minlength=I).double()
    return torch.where((deg > 0)[:, None], out / deg.clamp_min(1)[:, None], u).float(), deg
pm, deg = pred_mean(emb)
n = torch.from_numpy(counts).double()[:, None]
variants = {"default": emb, "neighbour_mean": mean_over_neighbours(log, emb)}
variants["pred_mean"] = pm
for lam in (3.0, 10.0):
    w = lam / (n + lam)
    variants[f"blend{lam:g}"] = ((1 - w) * unit(emb.double()) + w * unit(pm.double())).float()
for name, x in variants.items():
    t = time.time()
    codes = item_codes_for(log, x, levels=3, seed=0).item_codes.numpy()
    res = []
    for d in (1, 2):
        ce = bigram_cross_entropy(prefix_ids(codes, d), ts, td, src, dst)
        res.append(f"d{d}: all {ce.mean():.3f} " + " ".join(f"{k} {ce[m].mean():.3f}" for k, m in buckets.items()))
    print(f"{name:15s} " + " | ".join(res) + f"  ({time.time()-t:.0f}s)", flush=True)
