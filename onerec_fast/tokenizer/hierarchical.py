"""Lifelong-history compression by hierarchical k-means (OneRec TR 2.2), batched over many users.

A user's history of n items becomes at most ``max_items`` cluster representatives:

1. Start with the whole history as one cluster (a history of at most ``max_items`` items is kept as is: one
   cluster per item).
2. Each round splits clusters with k-means into ``k = floor(size^(1/3))`` (at least 2) sub-clusters, largest
   clusters first, as long as the user's cluster count stays within ``max_items`` (the last split of a round may
   get a smaller k to fit). Rounds repeat until no cluster can be split. The TR stops splitting once a cluster has
   at most M items; counting the budget instead makes ``count <= max_items`` hold for every history while using
   the budget fully (the final clusters are as small as ``max_items`` allows).
3. Each final cluster is represented by its member nearest the cluster mean; integer features (item id, author,
   labels: sparse) are taken from the representative, float features (timestamp, playtime, duration: continuous)
   are averaged over the cluster. Representatives are returned in history order (ascending row index).

All users of a call are clustered together: one segmented k-means per round over every cluster being split (no
Python loop over users or clusters), on the embeddings' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompressedHistory", "hierarchical_kmeans_compress"]

# Padded elements per chunk of the segmented k-means: segments * largest segment * D stays below this.
_CHUNK_ELEMS = 1 << 24


@dataclass
class CompressedHistory:
    """Result for B users with C representatives in total.

    * ``index``: int64 ``[C]``, the representative's row in the input (ascending within each user)
    * ``offsets``: int64 ``[B+1]``, user b owns representatives ``offsets[b]:offsets[b+1]``
    * ``cluster_size``: int64 ``[C]``, items each representative stands for
    * ``features``: ``{name: [C, ...]}``: integer features of the representative, float features averaged
    * ``assignment``: int64 ``[T]``, the cluster (0..C-1) of every input row
    """

    index: torch.Tensor
    offsets: torch.Tensor
    cluster_size: torch.Tensor
    features: dict[str, torch.Tensor]
    assignment: torch.Tensor


def _segment_rank(seg: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order rows by (seg, key, row) and return (order [P], rank of each ordered row within its segment [P])."""
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(seg[order], stable=True).indices]
    s = seg[order]
    pos = torch.arange(len(s), device=seg.device)
    start = torch.ones_like(s, dtype=torch.bool)
    start[1:] = s[1:] != s[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    return order, pos - first


def _farthest_point_init(xp: torch.Tensor, valid: torch.Tensor, kmax: int) -> torch.Tensor:
    """Deterministic seeding of every padded segment at once: ``xp: [s, pmax, D]``, ``valid: bool [s, pmax]`` ->
    ``[s, kmax, D]``: the member nearest the segment mean, then repeatedly the member farthest from the chosen
    ones (ties to the earliest row). Being a function of the segment alone, a user's compression does not depend
    on which other users share the call."""
    s = xp.shape[0]
    rows = torch.arange(s, device=xp.device)
    vf = valid.to(xp.dtype)
    x2 = (xp * xp).sum(-1)  # [s, pmax]

    def dist(c1: torch.Tensor) -> torch.Tensor:  # squared distance of every point to c1 [s, D], via a matvec
        return x2 - 2.0 * torch.bmm(xp, c1[:, :, None])[..., 0] + (c1 * c1).sum(-1)[:, None]

    mean = (xp * vf[..., None]).sum(1) / vf.sum(1).clamp_min(1)[:, None]
    c = xp.new_zeros(s, kmax, xp.shape[2])
    c[:, 0] = xp[rows, dist(mean).masked_fill(~valid, float("inf")).argmin(1)]
    d2 = dist(c[:, 0]).masked_fill(~valid, -1.0)
    for t in range(1, kmax):
        c[:, t] = xp[rows, d2.argmax(1)]
        d2 = torch.minimum(d2, dist(c[:, t]).masked_fill(~valid, -1.0))
    return c


def _segmented_kmeans(x: torch.Tensor, seg: torch.Tensor, k: torch.Tensor, iters: int) -> torch.Tensor:
    """k-means inside each segment at once: ``x: [P, D]``, ``seg: int64 [P]`` in [0, S), ``k: int64 [S]``.

    Returns the cluster of each point as a global id in ``[0, k.sum())`` (segment j owns ``koff[j]:koff[j]+k[j]``).
    Segments are sorted by size and cut into chunks; a chunk is padded to ``[s, pmax, D]`` and clustered with
    batched matmuls (padding stays small because neighbours in size order have similar sizes). Initial centroids
    by farthest-point seeding; an empty cluster keeps its old centroid.
    """
    d_ = x.shape[1]
    nseg = k.numel()
    koff = torch.cumsum(k, 0) - k
    ktot = int(k.sum())
    sizes = torch.bincount(seg, minlength=nseg)
    order, rank = _segment_rank(seg, torch.arange(x.shape[0], device=x.device))  # row order inside a segment
    seg_o = seg[order]
    label = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    by_size = torch.argsort(sizes).tolist()
    size_l, k_l = sizes.tolist(), k.tolist()
    i = 0
    while i < nseg:
        # Grow the chunk while its padded volume (segments x largest size x D) fits the budget and at least
        # half of it is real points (sizes ascend, so chunks become geometric size buckets).
        j, real = i + 1, size_l[by_size[i]]
        while j < nseg:
            nxt = size_l[by_size[j]]
            padded = (j + 1 - i) * nxt
            if padded * d_ > _CHUNK_ELEMS or padded > 2 * (real + nxt) + 64:
                break
            real += nxt
            j += 1
        segs = torch.tensor(by_size[i:j], device=x.device)
        s, pmax = j - i, size_l[by_size[j - 1]]
        local = torch.full((nseg,), -1, dtype=torch.int64, device=x.device)
        local[segs] = torch.arange(s, device=x.device)
        sel = local[seg_o] >= 0
        li, ri, rows = local[seg_o[sel]], rank[sel], order[sel]
        xp = x.new_zeros(s, pmax, d_)
        xp[li, ri] = x[rows]
        kmax = max(k_l[q] for q in by_size[i:j])
        valid = torch.arange(pmax, device=x.device)[None, :] < sizes[segs][:, None]  # [s, pmax]
        c = _farthest_point_init(xp, valid, kmax)
        # ||x||^2 does not change the argmin, so d = ||c||^2 - 2 x.c; absent centroids get +inf.
        cabsent = torch.arange(kmax, device=x.device)[None, :] >= k[segs][:, None]  # [s, kmax]
        codes = torch.arange(kmax, device=x.device)
        prev = None
        for it in range(iters + 1):
            c2 = (c * c).sum(-1).masked_fill_(cabsent, float("inf"))
            a = torch.baddbmm(c2[:, None, :], xp, c.transpose(1, 2), alpha=-2.0).argmin(-1)  # [s, pmax]
            # Converged (no point moved): small splits usually settle in 2-3 iterations.
            if it == iters or (prev is not None and torch.equal(a, prev)):
                break
            prev = a
            # Centroid update as a batched one-hot matmul (dense, no scatter): sums [s, kmax, D].
            onehot = ((a[..., None] == codes) & valid[..., None]).to(x.dtype)  # [s, pmax, kmax]
            cnt = onehot.sum(1)  # [s, kmax]
            sums = torch.bmm(onehot.transpose(1, 2), xp)
            c = torch.where((cnt > 0)[..., None], sums / cnt.clamp_min(1)[..., None], c)
        label[rows] = koff[seg_o[sel]] + a[li, ri]
        i = j
    # A segment k-means left whole (identical points) is split round-robin instead, so every split makes
    # progress and the rounds terminate.
    lo = torch.full((nseg,), ktot, dtype=torch.int64, device=x.device).scatter_reduce_(0, seg, label, "amin")
    hi = torch.full((nseg,), -1, dtype=torch.int64, device=x.device).scatter_reduce_(0, seg, label, "amax")
    whole = lo == hi
    stuck = whole[seg_o]
    if bool(stuck.any()):
        label[order[stuck]] = koff[seg_o[stuck]] + rank[stuck] % k[seg_o[stuck]]
    return label


def _plan_splits(size: torch.Tensor, user: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """k per cluster for this round (0 = not split). ``size``, ``user``: ``[K]``; ``remaining``: ``[B]`` budget."""
    want = torch.floor(size.double().pow(1.0 / 3.0) + 1e-9).long().clamp_min(2)
    want = torch.minimum(want, size)
    want = torch.where(size >= 2, want, torch.zeros_like(want))
    # Largest clusters first within each user; accept while the extra clusters (k - 1) fit the user's budget.
    order, _ = _segment_rank(user, -size)
    w, u = want[order], user[order]
    extra = (w - 1).clamp_min(0)
    cs = torch.cumsum(extra, 0)
    first = torch.ones_like(u, dtype=torch.bool)
    first[1:] = u[1:] != u[:-1]
    pos = torch.arange(len(u), device=u.device)
    start_idx = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    seg_start = (cs - extra)[start_idx]
    before = cs - extra - seg_start  # extra clusters accepted earlier in this user's list
    rem = remaining[u]
    k = torch.where((w >= 2) & (before < rem), torch.minimum(w, rem - before + 1), torch.zeros_like(w))
    out = torch.zeros_like(k)
    out[order] = k
    return out


def hierarchical_kmeans_compress(item_emb: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                                 max_items: int = 2000, *, offsets: torch.Tensor | None = None,
                                 iters: int = 10) -> CompressedHistory:
    """Compress histories to at most ``max_items`` representatives each (module docstring).

    Args:
        item_emb: float ``[T, D]``, the embedding of every history row (rows of all users concatenated).
        features: ``{name: [T, ...]}`` per-row features; integer/bool ones are taken from the representative,
            float ones averaged over the cluster.
        max_items: the most representatives per user.
        offsets: int ``[B+1]``, user b owns rows ``offsets[b]:offsets[b+1]`` (default: one user, all T rows).
        iters: Lloyd iterations per k-means.

    Deterministic (no random seeding), and a user's result does not depend on the other users of the call.
    """
    if not isinstance(item_emb, torch.Tensor) or item_emb.dim() != 2 or not item_emb.is_floating_point():
        raise ValueError(f"item_emb must be a float [T, D] tensor, got {getattr(item_emb, 'shape', type(item_emb))}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    dev, t = item_emb.device, item_emb.shape[0]
    offsets = torch.tensor([0, t]) if offsets is None else offsets
    offsets = offsets.to(dev, torch.int64)
    if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != t or bool(
            (offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing [B+1] from 0 to T={t}, got {offsets.tolist()[:8]}...")
    features = dict(features or {})
    for name, f in features.items():
        if not isinstance(f, torch.Tensor) or f.shape[0] != t:
            raise ValueError(f"features[{name!r}] must be a tensor with T={t} rows, got {getattr(f, 'shape', f)}")
    x = item_emb.detach().float()
    b = offsets.numel() - 1
    lens = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(torch.arange(b, device=dev), lens)

    if t == 0:
        z = torch.zeros(0, dtype=torch.int64, device=dev)
        return CompressedHistory(z, torch.zeros(b + 1, dtype=torch.int64, device=dev), z,
                                 {n: f[:0] for n, f in features.items()}, z)
    # Initial clusters: one per row for short histories, one per user for long ones.
    row = torch.arange(t, device=dev)
    cid = torch.where(lens[user] > max_items, t + user, row)
    while True:
        uniq, inv, size = torch.unique(cid, return_inverse=True, return_counts=True)
        cuser = torch.zeros_like(uniq).scatter_(0, inv, user)
        remaining = (max_items - torch.bincount(cuser, minlength=b)).clamp_min(0)
        k = _plan_splits(size, cuser, remaining)
        split = k[inv] > 0
        if not bool(split.any()):
            break
        _, seg = torch.unique(inv[split], return_inverse=True)
        ks = torch.zeros(int(seg.max()) + 1, dtype=torch.int64, device=dev).scatter_(0, seg, k[inv[split]])
        label = _segmented_kmeans(x[split], seg, ks, iters)
        cid = cid.clone()
        cid[split] = int(cid.max()) + 1 + label

    # Final clusters: representative = member nearest the mean, ties to the earliest row.
    _, inv, size = torch.unique(cid, return_inverse=True, return_counts=True)
    mean = torch.zeros(len(size), x.shape[1], device=dev).index_add_(0, inv, x) / size[:, None]
    d = ((x - mean[inv]) ** 2).sum(1)
    order, rank = _segment_rank(inv, d)
    rep = torch.empty_like(size)
    rep[inv[order[rank == 0]]] = order[rank == 0]
    # Renumber clusters by representative row: users stay contiguous, history order within a user.
    by_rep = torch.argsort(rep)
    new_id = torch.empty_like(by_rep)
    new_id[by_rep] = torch.arange(len(by_rep), device=dev)
    index, size = rep[by_rep], size[by_rep]
    assignment = new_id[inv]
    counts = torch.bincount(user[index], minlength=b)
    out_offsets = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    out_offsets[1:] = torch.cumsum(counts, 0)
    feats = {}
    for name, f in features.items():
        f = f.to(dev)
        if f.is_floating_point():
            s = torch.zeros((len(size),) + tuple(f.shape[1:]), dtype=f.dtype, device=dev).index_add_(0, assignment, f)
            feats[name] = s / size.view(-1, *([1] * (f.dim() - 1))).to(f.dtype)
        else:
            feats[name] = f[index]
    return CompressedHistory(index, out_offsets, size, feats, assignment)
