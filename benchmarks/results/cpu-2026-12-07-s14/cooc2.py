import collections, math, sys
W = 3
seqs = [list(map(int, l.split()[1:])) for l in open(sys.argv[1] if len(sys.argv) > 1 else "scratch/data/sports.txt")]
fwd = collections.defaultdict(collections.Counter); rev = collections.defaultdict(collections.Counter); cnt = collections.Counter()
for s in seqs:
    tr = s[:-2]
    for p, j in enumerate(tr):
        cnt[j] += 1
        for b in range(1, W + 1):
            if p - b >= 0:
                fwd[tr[p - b]][j] += 1; rev[j][tr[p - b]] += 1
pop = [i for i, _ in cnt.most_common(200)]
def ev(wr, split=-1):
    hit = 0; hitb = collections.Counter(); nb = collections.Counter()
    for s in seqs:
        t = s[split]; recent = s[:len(s) + split][-W:]
        sc = collections.Counter()
        for k, i in enumerate(reversed(recent)):
            for j, c in fwd[i].items(): sc[j] += math.log1p(c)
            if wr:
                for j, c in rev[i].items(): sc[j] += wr * math.log1p(c)
        for r, j in enumerate(pop): sc[j] += 1e-3 * (200 - r) / 200
        top = [j for j, _ in sc.most_common(10)]
        c = cnt[t]; bk = "<=5" if c <= 5 else "<=20" if c <= 20 else ">20"
        h = t in top; hit += h; hitb[bk] += h; nb[bk] += 1
    return round(hit / len(seqs), 4), {k: round(hitb[k] / nb[k], 4) for k in nb}
for wr in (0, 0.5, 1.0):
    print("reverse weight", wr, "test", ev(wr), "valid", ev(wr, -2), flush=True)
