"""RQ-KMeans tokenizer, k-means backends, collision handling, persistence, fusion and the tokenize CLI."""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import pytest
import torch

from onerec_fast.data.log import InteractionLog
from onerec_fast.tokenizer import (
    RQKMeans,
    collaborative_vectors,
    disambiguate,
    faiss_available,
    fuse_item_embeddings,
    mean_over_neighbours,
    kmeans,
    resolve_kmeans_backend,
)
from onerec_fast.tokenizer.fusion import text_vectors

from helpers import HAS_CUDA

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
# (backend, device) pairs: the torch backend also on CUDA (where the GPU machines have no faiss).
BACKEND_DEVICES = [("torch", "cpu"), pytest.param("torch", "cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device")), pytest.param("faiss", "cpu", marks=needs_faiss)]


def blobs(n=3000, k=12, d=8, sep=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    lab = torch.randint(0, k, (n,), generator=g)
    return centers[lab] + torch.randn(n, d, generator=g), lab, centers


def rq_world(n=4096, d=16, k=8, seed=0):
    """x = A[a] + B[b] + C[c] + noise, scales 10 / 3 / 1: residual structure with known codes."""
    g = torch.Generator().manual_seed(seed)
    books = [torch.randn(k, d, generator=g) * s for s in (10.0, 3.0, 1.0)]
    codes = torch.randint(0, k, (n, 3), generator=g)
    x = sum(b[codes[:, i]] for i, b in enumerate(books)) + 0.05 * torch.randn(n, d, generator=g)
    return x, codes


def purity(true: torch.Tensor, pred: torch.Tensor) -> float:
    """Fraction of points whose predicted cluster's majority true label is their own (1.0 = recovered)."""
    k = int(pred.max()) + 1
    m = int(true.max()) + 1
    table = torch.zeros(k, m, dtype=torch.long).index_put_((pred, true), torch.ones_like(pred), accumulate=True)
    return float(table.max(1).values.sum()) / len(true)


# ----------------------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_kmeans_finds_blobs(backend, device):
    x, lab, centers = blobs()
    r = kmeans(x, 12, backend=backend, device=device, seed=0)
    assert r.centroids.shape == (12, 8) and r.assign.shape == (3000,) and r.backend == backend
    assert purity(lab, r.assign) > 0.99 and purity(r.assign, lab) > 0.99
    best = float(((x - centers[lab]) ** 2).sum())
    assert r.inertia <= 1.05 * best


@needs_faiss
def test_faiss_and_torch_agree_on_quality():
    """Stated margin: inertia within 2% of each other, on clustered and on unstructured data."""
    for x in (blobs(seed=1)[0], torch.randn(4000, 16, generator=torch.Generator().manual_seed(2))):
        a = kmeans(x, 32, backend="torch", device="cpu", seed=0).inertia
        b = kmeans(x, 32, backend="faiss", seed=0).inertia
        assert abs(a - b) <= 0.02 * min(a, b), (a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_kmeans_balanced_sizes(backend, device):
    x, _, _ = blobs(n=1003)
    r = kmeans(x, 10, backend=backend, device=device, balanced=True, iters=5)
    sizes = torch.bincount(r.assign, minlength=10)
    assert int(sizes.min()) >= 100 and int(sizes.max()) <= 101 and int(sizes.sum()) == 1003
    # On data without cluster structure equal sizes cost little: within 10% of unconstrained k-means (5.6% seen).
    u = torch.rand(2000, 4, generator=torch.Generator().manual_seed(1))
    free = kmeans(u, 16, backend=backend, device=device).inertia
    assert kmeans(u, 16, backend=backend, device=device, balanced=True).inertia <= 1.10 * free


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(5, 2), 6, backend="torch", device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(5), 2, backend="torch", device="cpu")
    with pytest.raises(ValueError, match="backend"):
        resolve_kmeans_backend("cuda-magic")


def test_backend_resolution(monkeypatch):
    km = importlib.import_module("onerec_fast.tokenizer.kmeans")  # the package's `kmeans` name is the function

    monkeypatch.setattr(km, "faiss_available", lambda: False)
    with pytest.raises(RuntimeError, match="faiss is not installed"):
        km.resolve_kmeans_backend("faiss")
    name, dev, why = km.resolve_kmeans_backend("auto", "cpu")
    assert name == "torch" and dev.type == "cpu" and "not installed" in why
    monkeypatch.setenv("ONEREC_FAST_KMEANS_BACKEND", "torch")
    monkeypatch.setattr(km, "faiss_available", lambda: True)
    assert km.resolve_kmeans_backend("auto", "cpu")[0] == "torch"


# ----------------------------------------------------------------------------------------- RQ-KMeans
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_rq_kmeans_recovers_known_codes(backend, device):
    x, true = rq_world()
    rq = RQKMeans(levels=3, codebook_size=8, backend=backend, device=device, verbose=False).fit(x)
    codes = rq.item_codes[:, :3]
    for lvl in range(3):
        assert purity(true[:, lvl], codes[:, lvl]) > 0.98, lvl
        assert purity(codes[:, lvl], true[:, lvl]) > 0.98, lvl
    s = rq.stats()
    assert s["recon_loss"] < 1e-3
    assert [lv["utilization"] for lv in s["levels"]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device"))])
def test_encode_decode_round_trip(device):
    x, _ = rq_world(n=2048, seed=3)
    rq = RQKMeans(levels=3, codebook_size=8, backend="torch", device=device, verbose=False).fit(x)
    x = x.to(device)
    codes = rq.encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (2048, 3)
    assert codes.device == x.device
    assert torch.equal(codes.cpu(), rq.item_codes[:, :3])  # encode repeats fit's assignment
    recon = rq.decode(codes)
    rel = float(((x - recon) ** 2).sum() / (x ** 2).sum())
    assert rel == pytest.approx(rq.stats()["recon_loss"], rel=1e-4, abs=1e-7)
    assert torch.equal(rq.encode(rq.decode(codes)), codes)  # codewords map back to themselves
    assert torch.equal(rq.decode(rq.item_codes.to(device)), recon)  # the disambiguation column is ignored
    with pytest.raises(ValueError, match="codes"):
        rq.decode(torch.full((2, 3), 8, device=device))
    with pytest.raises(ValueError, match="columns"):
        rq.encode(torch.randn(4, 5, device=device))


def test_stats_are_consistent():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 12, generator=g)
    rq = RQKMeans(levels=3, codebook_size=[32, 16, 16], backend="torch", device="cpu", verbose=False).fit(x)
    s = rq.stats()
    recon = [lv["recon_loss"] for lv in s["levels"]]
    assert recon[0] > recon[1] > recon[2] > 0
    for lv in s["levels"]:
        assert 0 < lv["utilization"] <= 1 and 0 < lv["entropy_norm"] <= 1 + 1e-9
        assert lv["entropy_bits"] <= np.log2(lv["codebook_size"]) + 1e-9
    assert 0 <= s["collision_rate"] < 1
    assert "collision rate" in rq.format_stats()


def test_collisions_get_an_extra_unique_level():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 6, generator=g)
    x = torch.cat([base, base[:30], base[:30], base[:5]])  # exact duplicates must collide
    rq = RQKMeans(levels=3, codebook_size=16, backend="torch", device="cpu", verbose=False).fit(x)
    codes = rq.item_codes
    assert codes.shape == (265, 4)
    assert torch.unique(codes, dim=0).shape[0] == 265  # every item unique
    assert rq.stats()["collision_rate"] > 0 and rq.codebook_sizes[-1] == rq.stats()["max_group"]
    # Items with equal semantic codes are numbered 0, 1, 2... in item order.
    for i in range(5):
        group = (codes[:, :3] == codes[i, :3]).all(1).nonzero().flatten()
        assert codes[group, 3].tolist() == list(range(len(group)))
    kept = RQKMeans(levels=3, codebook_size=16, backend="torch", device="cpu", collisions="none",
                    verbose=False).fit(x)
    assert kept.item_codes.shape == (265, 3) and len(kept.codebook_sizes) == 3


def test_disambiguate_small():
    c = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    assert disambiguate(c)[:, 2].tolist() == [0, 0, 1, 2, 0]
    assert disambiguate(c[:0]).shape == (0, 3)


def test_codebook_capped_by_items(capsys):
    rq = RQKMeans(levels=2, codebook_size=64, backend="torch", device="cpu").fit(torch.randn(20, 4))
    assert rq.codebook_sizes[:2] == [20, 20]
    assert "RQ-KMeans on 20 items" in capsys.readouterr().out  # stats are printed after fit


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load(tmp_path, suffix):
    x, _ = rq_world(n=512, seed=7)
    rq = RQKMeans(levels=3, codebook_size=8, backend="torch", device="cpu", verbose=False).fit(x)
    path = tmp_path / f"rq{suffix}"
    rq.save(path)
    back = RQKMeans.load(path)
    assert torch.equal(back.item_codes, rq.item_codes)
    assert all(torch.equal(a, b) for a, b in zip(back.codebooks, rq.codebooks))
    assert torch.equal(back.encode(x), rq.encode(x))
    assert back.stats()["recon_loss"] == rq.stats()["recon_loss"]
    if suffix == ".pt":
        torch.load(path, weights_only=True)  # plain tensors + a JSON string only


def test_unfitted_and_bad_config():
    with pytest.raises(RuntimeError, match="not fitted"):
        RQKMeans(verbose=False).encode(torch.randn(2, 3))
    with pytest.raises(ValueError, match="codebook_size"):
        RQKMeans(levels=3, codebook_size=[8, 8])
    with pytest.raises(ValueError, match="collisions"):
        RQKMeans(collisions="drop")


# ----------------------------------------------------------------------------------------- fusion
def two_community_log() -> InteractionLog:
    """Users 0..29 watch items 0..9, users 30..59 items 10..19 (shuffled), every item has the same genre."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(60):
        pool = np.arange(10) + (0 if u < 30 else 10)
        seq = rng.choice(pool, 12)
        users += [u] * 12
        items += seq.tolist()
    n = len(users)
    return InteractionLog(user=np.array(users), item=np.array(items), timestamp=np.arange(n), num_users=60,
                          num_items=20, item_features={"genre": np.ones(20, dtype=np.int64)},
                          item_titles=[f"alpha movie {i}" if i < 10 else f"zeta film {i}" for i in range(20)]).sort_()


def _cos(a):
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    return a @ a.T


def test_collaborative_vectors_separate_communities():
    v = collaborative_vectors(two_community_log(), dim=4)
    s = _cos(v)
    within = (s[:10, :10].mean() + s[10:, 10:].mean()) / 2
    across = s[:10, 10:].mean()
    assert within > across + 0.5


def test_mean_over_neighbours_exact():
    # user 0: 0 1 2 | held out 3 4; user 1: 2 0 2 | held out 4 4. Window 1: 0-1 once, 1-2 once, 0-2 twice.
    log = InteractionLog(user=np.array([0] * 5 + [1] * 5), item=np.array([0, 1, 2, 3, 4, 2, 0, 2, 4, 4]),
                         timestamp=np.arange(10), num_users=2, num_items=6).sort_()
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 0.0], [0.0, 1.0], [0.0, -4.0]])
    unit = x / x.norm(dim=1, keepdim=True)
    got = mean_over_neighbours(log, x, window=1, holdout=2)
    want = torch.stack([(unit[1] + 2 * unit[2]) / 3,  # item 0: once next to 1, twice next to 2
                        (unit[0] + unit[2]) / 2, (unit[1] + 2 * unit[0]) / 3,
                        unit[3], unit[4], unit[5]])  # 3, 4 only in held-out positions, 5 never seen: own vector
    torch.testing.assert_close(got, want)
    assert got.dtype == x.dtype
    with pytest.raises(ValueError, match="num_items=6"):
        mean_over_neighbours(log, x[:5])


def test_fusion_neighbour_mean_keeps_communities():
    emb, info = fuse_item_embeddings(two_community_log(), dim=8, text="hashed-tfidf", neighbour_mean=True)
    assert info["neighbour_mean"] and emb.shape == (20, 8) and torch.isfinite(emb).all()
    s = _cos(emb.numpy())
    assert (s[:10, :10].mean() + s[10:, 10:].mean()) / 2 > s[:10, 10:].mean() + 0.5


def test_text_fallback_and_fusion():
    tv, enc = text_vectors(["red apple pie", "red apple tart", "quantum field theory"], dim=64,
                           encoder="hashed-tfidf")
    s = _cos(tv)
    assert enc == "hashed-tfidf" and s[0, 1] > s[0, 2]
    emb, info = fuse_item_embeddings(two_community_log(), dim=8, text="hashed-tfidf")
    assert emb.shape == (20, 8) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert "title:hashed-tfidf" in info["content_blocks"] and "genre:onehot" in info["content_blocks"]
    s = _cos(emb.numpy())
    assert (s[:10, :10].mean() + s[10:, 10:].mean()) / 2 > s[:10, 10:].mean()


# ----------------------------------------------------------------------------------------- CLI
def test_tokenize_cli_on_synthetic(capsys, tmp_path):
    from onerec_fast.tokenizer import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tmp_path / "rq.safetensors"
    args = p.parse_args(["--data", "synthetic", "--num-users", "60", "--num-items", "300", "--dim", "16",
                         "--codebook-size", "8", "--iters", "5", "--backend", "torch", "--device", "cpu",
                         "--out", str(out)])
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "collision rate" in text and "encode matches fit codes for 100.0%" in text
    assert RQKMeans.load(out).item_codes.shape[0] == 300


# ----------------------------------------------------------------------------------------- bad embeddings
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rq_kmeans_rejects_non_finite_embeddings(backend, device, bad):
    """Issue 17, finding 3: a clear ValueError naming the row, not "invalid multinomial distribution"."""
    emb = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    emb[17, 3] = bad
    with pytest.raises(ValueError, match=r"emb must be finite: 1 of 64 rows hold NaN or inf \(first: row 17\)"):
        RQKMeans(levels=2, codebook_size=4, backend=backend, device=device, verbose=False).fit(emb)
    with pytest.raises(ValueError, match="x must be finite"):
        kmeans(emb, 4, backend=backend, device=device)


def test_rq_kmeans_rejects_zero_columns_on_both_backends():
    """Issue 17, finding 4: D = 0 killed the process with SIGFPE under faiss (and the torch backend returned
    codes). Run in a child process, so a crash fails this test instead of ending the test session."""
    import subprocess
    import sys

    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    script = (
        "import sys, torch\n"
        "from onerec_fast.tokenizer import RQKMeans\n"
        "for backend in sys.argv[1:]:\n"
        "    try:\n"
        "        RQKMeans(levels=2, codebook_size=4, backend=backend, device='cpu', verbose=False)"
        ".fit(torch.randn(64, 0))\n"
        "    except ValueError as e:\n"
        "        print(backend, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *backends], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the fit crashed (exit {done.returncode}): {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == len(backends), done.stdout
    for backend, line in zip(backends, lines):
        assert line == f"{backend} emb must have at least one column (D >= 1), got shape (64, 0)"
