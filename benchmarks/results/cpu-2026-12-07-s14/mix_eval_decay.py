import collections, numpy as np, torch, sys, math
d = torch.load(sys.argv[1]); W = 3
li, off = d["log_item"].numpy(), d["offsets"].numpy()
fwd = collections.defaultdict(collections.Counter); cnt = collections.Counter()
for u in range(len(off) - 1):
    tr = li[off[u]:off[u + 1]][:-2]
    for p in range(len(tr)):
        cnt[tr[p]] += 1
        for b in range(1, W + 1):
            if p - b >= 0: fwd[tr[p - b]][tr[p]] += 1
nsum = {i: sum(c.values()) for i, c in fwd.items()}
for gamma in map(float, sys.argv[2].split(",")):
  for split in ("valid", "test"):
    s = d[split]; res = collections.defaultdict(collections.Counter)
    for r in range(len(s["users"])):
        u, p, t = int(s["users"][r]), int(s["pos"][r]), int(s["targets"][r])
        recent = list(li[off[u]:off[u] + p][-W:])[::-1]  # newest first
        a = [gamma ** k for k in range(len(recent))]
        n = sum(ak * nsum.get(i, 0) for ak, i in zip(a, recent))
        pm = collections.Counter()
        for ak, i in zip(a, recent):
            for j, c in fwd[i].items(): pm[j] += ak * c / n
        nn = {int(j): float(v) for j, v in zip(s["items"][r], s["scores"][r]) if j >= 0}
        for lam in (0.75, 0.5):
            cand = set(nn) | set(pm)
            sc = {j: math.log(lam * math.exp(nn.get(j, -1e9)) + (1 - lam) * pm.get(j, 0.0) + 1e-30) for j in cand}
            top = sorted(cand, key=lambda j: -sc[j])[:10]
            hit = t in top; rank = top.index(t) if hit else None
            res[lam]["n"] += 1; res[lam]["r"] += hit; res[lam]["nd"] += (1 / math.log2(rank + 2)) if hit else 0
    print("gamma", gamma, split, {lam: "R@10 %.4f N@10 %.4f" % (c["r"] / c["n"], c["nd"] / c["n"]) for lam, c in res.items()}, flush=True)
