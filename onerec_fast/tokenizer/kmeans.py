"""K-means with two backends and a balanced (equal-size) variant.

Backends:

* ``faiss``: ``faiss.Kmeans`` (faiss-cpu, or faiss-gpu where installed) for the Lloyd iterations and
  ``IndexFlatL2`` for assignment. Needs the optional ``faiss-cpu`` package.
* ``torch``: a built-in Lloyd k-means in PyTorch (chunked ``||x||^2 - 2 x c^T + ||c||^2`` distances, scatter-mean
  updates); runs on CUDA when a GPU is visible, else on CPU. The GPU machines have no faiss, so this is their path.

``backend="auto"`` (or the ``ONEREC_FAST_KMEANS_BACKEND`` environment variable) picks ``torch`` on CUDA when a GPU is
visible and faiss has none, else ``faiss`` when importable, else ``torch`` on CPU; :func:`resolve_kmeans_backend`
returns the reason, which ``RQKMeans`` prints.

Both backends start from the same initial centroids (greedy k-means++ for ``k <= 1024``, a random sample of points for
larger k, where sequential k-means++ costs k passes), train on at most ``max_points_per_centroid * k`` sampled points
(faiss' rule), reseed empty clusters with the points farthest from their centroid, and assign every point at the end.

``balanced=True`` gives equal-size clusters, as OneRec V1's balanced k-means: starting from the unconstrained
solution, each iteration assigns points under a capacity of ``N // k`` (or ``N // k + 1``) per cluster (see
:func:`_balanced_assign`: points propose to their nearest open cluster, clusters keep their nearest proposers), then
moves centroids to their members' mean. OneRec's own procedure (fill clusters one after another with the nearest
unassigned points) ends with the same sizes but leaves the last clusters the leftovers; proposals keep every point
as near as capacity allows. This step runs in PyTorch on either backend (faiss has no capacity-constrained assignment).

Points are checked up front (:func:`check_points`): at least one column, every value finite. Otherwise ValueError
names the first bad row, for both backends alike (faiss kills the process with SIGFPE on D = 0, and NaN points
turn k-means++ seeding into an invalid multinomial).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["KMeansResult", "check_points", "faiss_available", "kmeans", "nearest_centroid", "resolve_kmeans_backend"]

_KMEANS_BACKENDS = ("faiss", "torch")
# Distance-matrix chunk: rows * k stays below this many elements (256 MiB of fp32).
_CHUNK_ELEMS = 1 << 26
_KMEANSPP_MAX_K = 1024


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_kmeans_backend(backend: str = "auto", device=None) -> tuple[str, torch.device, str]:
    """Pick ``(backend, device, reason)`` for k-means.

    ``device`` is where the torch backend computes (default: CUDA when visible, else CPU); faiss computes on CPU
    (or its own GPUs). An explicit backend that is unavailable raises ``RuntimeError``.
    """
    if backend == "auto":
        backend = os.environ.get("ONEREC_FAST_KMEANS_BACKEND", "auto") or "auto"
    if backend not in _KMEANS_BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {_KMEANS_BACKENDS + ('auto',)}, got {backend!r}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    has_faiss = faiss_available()
    if backend == "faiss":
        if not has_faiss:
            raise RuntimeError("k-means backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return "faiss", torch.device("cpu"), "faiss requested"
    if backend == "torch":
        return "torch", dev, f"torch requested, on {dev}"
    if dev.type == "cuda" and not (has_faiss and _faiss_gpus() > 0):
        why = "faiss has no GPU here" if has_faiss else "faiss is not installed"
        return "torch", dev, f"auto: torch k-means on {dev} ({why})"
    if has_faiss:
        return "faiss", torch.device("cpu"), f"auto: faiss {'GPU' if _faiss_gpus() else 'CPU'}"
    return "torch", dev, f"auto: torch k-means on {dev} (faiss is not installed)"


@dataclass
class KMeansResult:
    """``centroids: float32 [k, D]``, ``assign: int64 [N]``, ``inertia``: sum of squared distances to centroids."""

    centroids: torch.Tensor
    assign: torch.Tensor
    inertia: float
    backend: str


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor,
                     backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [N, D]``, ``centroids: [k, D]`` -> (index int64 ``[N]``, squared distance float32 ``[N]``) on x's device."""
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32))
        d2, idx = index.search(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32), 1)
        return torch.from_numpy(idx[:, 0]).long().to(x.device), torch.from_numpy(d2[:, 0]).to(x.device)
    c = centroids.to(x.device, torch.float32)
    c2 = (c * c).sum(1)
    rows = max(1, _CHUNK_ELEMS // max(1, c.shape[0]))
    idx, dist = [], []
    for s in range(0, x.shape[0], rows):
        xs = x[s:s + rows].float()
        d = (xs * xs).sum(1, keepdim=True) - 2.0 * (xs @ c.T) + c2
        m, i = d.min(1)
        idx.append(i)
        dist.append(m.clamp_min_(0.0))
    if not idx:
        return x.new_zeros(0, dtype=torch.int64), x.new_zeros(0, dtype=torch.float32)
    return torch.cat(idx), torch.cat(dist)


def _init_centroids(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ for k <= 1024, else k distinct random points. ``x: [N, D]`` -> ``[k, D]``.

    Greedy k-means++ (as scikit-learn): each step draws ``2 + log k`` candidates by D^2 sampling and keeps the one
    that lowers the potential most, which avoids most of plain k-means++'s merged-cluster local minima.
    """
    n = x.shape[0]
    if k > _KMEANSPP_MAX_K:
        return x[torch.randperm(n, generator=gen, device=gen.device)[:k].to(x.device)].clone()
    trials = 2 + int(np.log(k))
    c = x.new_empty(k, x.shape[1])
    c[0] = x[torch.randint(n, (1,), generator=gen, device=gen.device).to(x.device)]
    x2 = (x * x).sum(1)
    d2 = ((x - c[0]) ** 2).sum(1)
    for i in range(1, k):
        # Points already chosen have d2 == 0, so they are not drawn again while others remain.
        w = d2 if bool((d2 > 0).any()) else torch.ones_like(d2)
        cand = torch.multinomial(w.to(gen.device), trials, replacement=True, generator=gen).to(x.device)
        xc = x[cand]
        dist = (x2[None, :] - 2.0 * (xc @ x.T) + x2[cand][:, None]).clamp_min_(0.0)
        dc = torch.minimum(d2[None, :], dist)  # [trials, N]
        best = dc.sum(1).argmin()
        c[i] = x[cand[best]]
        d2 = dc[best]
    return c


def _update(x: torch.Tensor, assign: torch.Tensor, d2: torch.Tensor, k: int, old: torch.Tensor) -> torch.Tensor:
    """New centroids = mean of members; an empty cluster takes the point farthest from its centroid."""
    sums = torch.zeros_like(old).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k)
    c = sums / counts.clamp_min(1)[:, None].to(x.dtype)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.topk(d2, min(empty.numel(), x.shape[0])).indices
        c[empty[: far.numel()]] = x[far]
    return c


def _balanced_assign(x: torch.Tensor, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Capacity-constrained assignment: ``x: [N, D]``, ``c: [k, D]`` -> ``[N]`` with N // k or N // k + 1 per cluster.

    Rounds of proposals: every unassigned point proposes to its nearest cluster that still has room; each cluster
    keeps its nearest proposers up to its remaining capacity and rejects the rest, which propose again next round
    among the clusters still open. Every round fills at least one cluster, so it ends within k rounds (a few in
    practice), and each point ends in the nearest cluster that had room when it was placed.
    """
    n, k = x.shape[0], c.shape[0]
    base, extra = divmod(n, k)
    cap = torch.full((k,), base, dtype=torch.int64, device=x.device)
    cap[torch.randperm(k, generator=gen, device=gen.device)[:extra].to(x.device)] += 1
    assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    free = torch.arange(n, device=x.device)
    while free.numel():
        open_ = (cap > 0).nonzero().flatten()
        j, d2 = nearest_centroid(x[free], c[open_])
        prop = open_[j]
        order = torch.sort(d2, stable=True).indices
        order = order[torch.sort(prop[order], stable=True).indices]  # by cluster, nearest first
        p = prop[order]
        start = torch.ones_like(p, dtype=torch.bool)
        start[1:] = p[1:] != p[:-1]
        pos = torch.arange(len(p), device=x.device)
        rank = pos - torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        ok = rank < cap[p]
        assign[free[order[ok]]] = p[ok]
        cap -= torch.bincount(p[ok], minlength=k)
        free = free[order[~ok]]
    return assign


def check_points(name: str, x: torch.Tensor) -> None:
    """Raise ValueError (naming ``name``) unless the float ``x: [N, D]`` has D >= 1 and only finite values."""
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column (D >= 1), got shape {tuple(x.shape)}")
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{name} must be finite: {len(bad)} of {x.shape[0]} rows hold NaN or inf "
                         f"(first: row {int(bad[0])})")


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, backend: str = "auto", device=None,
           balanced: bool = False, max_points_per_centroid: int = 256) -> KMeansResult:
    """Cluster ``x: [N, D]`` into ``k`` clusters (``k <= N``).

    Returns centroids float32 ``[k, D]`` and the assignment int64 ``[N]`` on x's device. Reproducible for a given
    seed, backend and device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, D], got {type(x).__name__} {getattr(x, 'shape', '')}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    check_points("x", x)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    name, dev, _ = resolve_kmeans_backend(backend, device)
    out_device = x.device
    xd = x.detach().to(dev if name == "torch" else "cpu", torch.float32).contiguous()
    gen = torch.Generator(device=xd.device)
    gen.manual_seed(seed)
    train = xd
    if n > max_points_per_centroid * k:
        train = xd[torch.randperm(n, generator=gen, device=xd.device)[: max_points_per_centroid * k]]
    c = _init_centroids(train, k, gen)
    if name == "faiss":
        import faiss

        km = faiss.Kmeans(xd.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=max_points_per_centroid,
                          min_points_per_centroid=1, verbose=False, gpu=_faiss_gpus() > 0)
        if iters > 0:
            km.train(train.numpy(), init_centroids=c.numpy())
            c = torch.from_numpy(km.centroids.copy())
    else:
        for _ in range(iters):
            a, d2 = nearest_centroid(train, c)
            c = _update(train, a, d2, k, c)
    if balanced:
        for _ in range(max(1, iters)):
            a = _balanced_assign(xd, c, gen)
            c = torch.zeros_like(c).index_add_(0, a, xd) / torch.bincount(a, minlength=k).clamp_min(1)[:, None]
        d2 = ((xd - c[a]) ** 2).sum(1)
    else:
        a, d2 = nearest_centroid(xd, c, name)
    return KMeansResult(c.to(out_device), a.to(out_device), float(d2.double().sum()), name)
