import collections, numpy as np, torch, sys, math
d = torch.load(sys.argv[1])
W = int(sys.argv[2]) if len(sys.argv) > 2 else 3
GAMMA = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0  # window slot k (0 = newest) weighs GAMMA ** k
li, off = d["log_item"].numpy(), d["offsets"].numpy()
fwd = collections.defaultdict(collections.Counter); cnt = collections.Counter()
for u in range(len(off) - 1):
    tr = li[off[u]:off[u + 1]][:-2]
    for p in range(len(tr)):
        cnt[tr[p]] += 1
        for b in range(1, W + 1):
            if p - b >= 0: fwd[tr[p - b]][tr[p]] += 1
nsum = {i: sum(c.values()) for i, c in fwd.items()}
def bucket(c): return "<=5" if c <= 5 else "<=20" if c <= 20 else ">20"
for split in ("valid", "test"):
    s = d[split]; res = collections.defaultdict(lambda: collections.Counter())
    for r in range(len(s["users"])):
        u, p, t = int(s["users"][r]), int(s["pos"][r]), int(s["targets"][r])
        recent = list(li[off[u]:off[u] + p][-W:])[::-1]  # newest first
        a = [GAMMA ** k for k in range(len(recent))]
        pm = collections.Counter(); n = sum(ak * nsum.get(i, 0) for ak, i in zip(a, recent))
        for ak, i in zip(a, recent):
            for j, c in fwd[i].items(): pm[j] += ak * c / n
        nn = {int(j): float(v) for j, v in zip(s["items"][r], s["scores"][r]) if j >= 0}
        b = bucket(cnt[t])
        for lam in (1.0, 0.9, 0.8, 0.7, 0.5, 0.0):
            cand = set(nn) | set(pm)
            sc = {j: math.log(lam * math.exp(nn.get(j, -1e9)) + (1 - lam) * pm.get(j, 0.0) + 1e-30) for j in cand}
            top = sorted(cand, key=lambda j: -sc[j])[:10]
            hit = t in top; rank = top.index(t) if hit else None
            res[lam]["n"] += 1; res[lam]["r"] += hit; res[lam]["nd"] += (1 / math.log2(rank + 2)) if hit else 0
            res[lam]["n" + b] += 1; res[lam]["r" + b] += hit
    for lam, c in res.items():
        print(split, "lambda", lam, "R@10 %.4f N@10 %.4f" % (c["r"] / c["n"], c["nd"] / c["n"]),
              {b: round(c["r" + b] / max(1, c["n" + b]), 4) for b in ("<=5", "<=20", ">20")}, flush=True)
