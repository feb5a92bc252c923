"""Lifelong compression: hierarchical k-means invariants, batched over users."""

from __future__ import annotations

import pytest
import torch

from helpers import DEVICES
from onerec_fast.tokenizer import hierarchical_kmeans_compress


def histories(lens, d=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    off = torch.zeros(len(lens) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(lens, 0)
    t = int(off[-1])
    x = torch.randn(t, d, generator=g)
    feats = {
        "timestamp": torch.arange(t, dtype=torch.float64) * 60.0 + 1.7e9,  # continuous: averaged
        "playtime": torch.rand(t, generator=g) * 100,  # continuous: averaged
        "item": torch.randint(0, 10**6, (t,), generator=g),  # sparse: from the representative
        "like": torch.randint(0, 2, (t,), generator=g).bool(),  # sparse
    }
    return x.to(device), {k: v.to(device) for k, v in feats.items()}, off.to(device)


def check_invariants(x, feats, off, res, max_items):
    b = off.numel() - 1
    lens = off[1:] - off[:-1]
    counts = res.offsets[1:] - res.offsets[:-1]
    assert res.offsets[0] == 0 and res.offsets[-1] == res.index.numel()
    assert bool((counts <= max_items).all()), counts
    # Short histories stay as they are; long ones use the whole budget.
    assert torch.equal(counts[lens <= max_items], lens[lens <= max_items])
    assert bool((counts[lens > max_items] == max_items).all())
    for u in range(b):
        idx = res.index[res.offsets[u]:res.offsets[u + 1]]
        assert bool((idx >= off[u]).all() and (idx < off[u + 1]).all())  # a user's own rows
        assert bool((idx[1:] > idx[:-1]).all())  # history order
    c = torch.arange(res.index.numel(), device=x.device)
    assert torch.equal(res.assignment[res.index], c)  # representatives are members of their cluster
    assert torch.equal(torch.bincount(res.assignment, minlength=len(c)), res.cluster_size)
    # Averages of continuous features, representative's value for sparse ones.
    for name in ("timestamp", "playtime"):
        mean = torch.zeros(len(c), dtype=feats[name].dtype, device=x.device).index_add_(
            0, res.assignment, feats[name]) / res.cluster_size.to(feats[name].dtype)
        torch.testing.assert_close(res.features[name], mean)
        assert res.features[name].dtype == feats[name].dtype
    for name in ("item", "like"):
        assert torch.equal(res.features[name], feats[name][res.index])
    # The representative is the member nearest its cluster's mean.
    centroid = torch.zeros(len(c), x.shape[1], device=x.device).index_add_(0, res.assignment, x)
    centroid /= res.cluster_size[:, None]
    d = ((x - centroid[res.assignment]) ** 2).sum(1)
    best = torch.full((len(c),), float("inf"), device=x.device).scatter_reduce(0, res.assignment, d, "amin")
    torch.testing.assert_close(d[res.index], best)


@pytest.mark.parametrize("device", DEVICES)
def test_invariants_batched(device):
    lens = [3, 0, 50, 700, 64, 2000, 129]
    x, feats, off = histories(lens, device=device)
    for max_items in (1, 7, 64, 128):
        res = hierarchical_kmeans_compress(x, feats, max_items, offsets=off)
        check_invariants(x, feats, off, res, max_items)


def test_single_user_default_offsets():
    x, feats, off = histories([5000])
    res = hierarchical_kmeans_compress(x, feats, 300)
    check_invariants(x, feats, off, res, 300)


def test_recovers_clusters():
    """Five far-apart blobs and a budget of 5: one pure cluster per blob."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 16, generator=g) * 50
    lab = torch.randint(0, 5, (3000,), generator=g)
    x = centers[lab] + torch.randn(3000, 16, generator=g)
    res = hierarchical_kmeans_compress(x, None, 5, iters=10)
    assert res.index.numel() <= 5
    for c in range(res.index.numel()):
        assert lab[res.assignment == c].unique().numel() == 1


def test_deterministic_and_independent_of_batch():
    x, feats, off = histories([400, 900, 2500], seed=3)
    a = hierarchical_kmeans_compress(x, feats, 100, offsets=off)
    b = hierarchical_kmeans_compress(x, feats, 100, offsets=off)
    assert torch.equal(a.index, b.index) and torch.equal(a.assignment, b.assignment)
    assert int(a.cluster_size.sum()) == 3800
    # A user's compression does not depend on the other users of the call.
    alone = hierarchical_kmeans_compress(x[400:1300], None, 100)
    assert torch.equal(alone.index + 400, a.index[a.offsets[1]:a.offsets[2]])


def test_edge_cases_and_errors():
    res = hierarchical_kmeans_compress(torch.zeros(0, 4), {"t": torch.zeros(0)}, 10,
                                       offsets=torch.tensor([0, 0]))
    assert res.index.numel() == 0 and res.offsets.tolist() == [0, 0]
    # Identical points: splitting cannot separate them, yet counts stay within budget.
    res = hierarchical_kmeans_compress(torch.ones(100, 3), None, 10)
    assert res.index.numel() <= 10 and int(res.cluster_size.sum()) == 100
    with pytest.raises(ValueError, match="max_items"):
        hierarchical_kmeans_compress(torch.randn(4, 2), None, 0)
    with pytest.raises(ValueError, match="offsets"):
        hierarchical_kmeans_compress(torch.randn(4, 2), None, 2, offsets=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="features"):
        hierarchical_kmeans_compress(torch.randn(4, 2), {"t": torch.zeros(3)}, 2)
