import collections, numpy as np, sys
W = 3
seqs = [list(map(int, l.split()[1:])) for l in open(sys.argv[1] if len(sys.argv) > 1 else "scratch/data/sports.txt")]
fwd = collections.Counter(); cnt = collections.Counter()
for s in seqs:
    tr = s[:-2]
    for p, j in enumerate(tr):
        cnt[j] += 1
        for b in range(1, W + 1):
            if p - b >= 0: fwd[(tr[p - b], j)] += 1
for Wt in (3, 5):
  res = collections.defaultdict(lambda: [0, 0, 0])
  for s in seqs:
    t = s[-1]; recent = s[-1 - Wt:-1]
    c = cnt[t]; bk = "<=5" if c <= 5 else "<=10" if c <= 10 else "<=20" if c <= 20 else "<=50" if c <= 50 else ">50"
    f = any(fwd[(i, t)] > 0 for i in recent); bw = any(fwd[(t, i)] > 0 for i in recent)
    r = res[bk]; r[0] += 1; r[1] += f; r[2] += f or bw
  print("test window", Wt, {k: (v[0], round(v[1] / v[0], 3), round(v[2] / v[0], 3)) for k, v in sorted(res.items())})
