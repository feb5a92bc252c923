"""RQ-KMeans: residual k-means semantic ids (OneRec TR 2.1.2).

Level l clusters the residuals left by levels ``0..l-1``: ``r_0 = x``, ``c_l = argmin_k ||r_l - C_l[k]||``,
``r_{l+1} = r_l - C_l[c_l]``, so an item's codes ``(c_0, c_1, c_2)`` go from coarse to fine and
``decode(codes) = sum_l C_l[c_l]`` reconstructs it.

Collision policy (``collisions=``), for items that share all ``levels`` codes:

* ``"extra_level"`` (default, as TIGER): one more code column numbers the items inside each group of equal codes
  0, 1, 2... in item-id order, so every item's code is unique. The extra level's vocabulary is the largest group
  size (1 when nothing collides); it is always present under this policy so code shapes do not depend on the data.
* ``"none"``: codes are the ``levels`` semantic codes only; a trie leaf then holds several items (the trie keeps
  all of them and decoding returns the smallest item id, see docs/TRIE_FORMAT.md).

``item_codes`` (int64 ``[N, L]``, ``L = levels + 1`` under ``"extra_level"``) are the fitted items' final codes; the
model predicts them and the trie is built from them. ``encode`` maps new embeddings to the ``levels`` semantic
codes (no disambiguation: that is a property of a catalogue, not of one embedding).

``stats()`` (printed after ``fit`` when ``verbose``): per level the codebook size, codes used, utilization
(used / size), entropy of the code distribution in bits and normalized by ``log2(size)``, and the relative
reconstruction loss ``sum ||x - x_hat_l||^2 / sum ||x||^2`` after that level; then the collision rate
``1 - unique code tuples / N`` and the largest group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from onerec_fast.tokenizer.kmeans import check_points, kmeans, nearest_centroid, resolve_kmeans_backend

__all__ = ["RQKMeans", "disambiguate"]

_COLLISIONS = ("extra_level", "none")
_FORMAT = "onerec_fast.RQKMeans/1"


def disambiguate(codes: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """Append a column numbering items with equal codes: ``codes: int64 [N, L]`` -> unique ``[N, L + 1]``.

    Within a group of equal rows the extra code follows ``rank: [N]`` (ascending; e.g. minus the training
    popularity, so code 0 is the group's most popular item in every group and the last code level means the
    same thing across groups), ties and ``rank=None`` in row order: 0 for the first, 1 for the next...
    """
    n = codes.shape[0]
    if n == 0:
        return codes.new_zeros(0, codes.shape[1] + 1)
    _, inv = torch.unique(codes, dim=0, return_inverse=True)
    # Stable sort by (group, rank) keeps row order among ties; rank inside the group = position - group start.
    order = torch.arange(n, device=codes.device)
    if rank is not None:
        if rank.shape != (n,):
            raise ValueError(f"rank must have one value per item [{n}], got {tuple(rank.shape)}")
        order = torch.sort(rank.to(codes.device), stable=True).indices
    order = order[torch.sort(inv[order], stable=True).indices]
    g = inv[order]
    start = torch.ones_like(g, dtype=torch.bool)
    start[1:] = g[1:] != g[:-1]
    pos = torch.arange(n, device=codes.device)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    extra = torch.empty_like(g)
    extra[order] = pos - first
    return torch.cat([codes, extra[:, None]], 1)


class RQKMeans:
    """Residual k-means tokenizer.

    Args:
        levels: number of residual levels (3 in OneRec).
        codebook_size: codes per level, an int or one int per level (8192 in OneRec). A level never gets more codes
            than there are items; the fitted sizes are in ``codebook_sizes``.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"`` (see :mod:`onerec_fast.tokenizer.kmeans`).
        seed: all randomness (initialization, subsampling, balanced visiting order).
        balanced: equal-size clusters at every level (OneRec V1's balanced k-means).
        iters: Lloyd iterations per level.
        collisions: ``"extra_level"`` or ``"none"`` (module docstring).
        device: where the torch backend computes (default CUDA when visible).
        verbose: print the backend choice and the stats table after ``fit``.
    """

    def __init__(self, levels: int = 3, codebook_size: int | list[int] = 8192, backend: str = "auto", seed: int = 0,
                 balanced: bool = False, iters: int = 20, collisions: str = "extra_level", device=None,
                 max_points_per_centroid: int = 256, verbose: bool = True):
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        sizes = [codebook_size] * levels if isinstance(codebook_size, int) else list(codebook_size)
        if len(sizes) != levels or any(int(k) < 1 for k in sizes):
            raise ValueError(f"codebook_size must be a positive int or {levels} positive ints, got {codebook_size!r}")
        if collisions not in _COLLISIONS:
            raise ValueError(f"collisions must be one of {_COLLISIONS}, got {collisions!r}")
        self.levels, self.requested_sizes = levels, [int(k) for k in sizes]
        self.backend, self.seed, self.balanced, self.iters = backend, seed, balanced, iters
        self.collisions, self.device, self.max_points_per_centroid = collisions, device, max_points_per_centroid
        self.verbose = verbose
        self.codebooks: list[torch.Tensor] = []  # float32 [K_l, D] each, on CPU
        self.item_codes: torch.Tensor | None = None  # int64 [N, L]
        self._stats: dict | None = None
        self.backend_used = ""

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        return bool(self.codebooks)

    @property
    def codebook_sizes(self) -> list[int]:
        """Vocabulary of every code column of ``item_codes`` (incl. the disambiguation level)."""
        sizes = [c.shape[0] for c in self.codebooks]
        if self.collisions == "extra_level" and self.item_codes is not None:
            sizes.append(int(self.item_codes[:, -1].max()) + 1 if len(self.item_codes) else 1)
        return sizes

    def fit(self, emb: torch.Tensor, rank: torch.Tensor | None = None) -> "RQKMeans":
        """Fit on item embeddings ``emb: float [N, D]`` (row i = item i); sets ``codebooks`` and ``item_codes``.
        ``rank: [N]`` orders the items of a collision group on the extra level (see :func:`disambiguate`).
        ValueError, before any backend runs, unless N >= 1, D >= 1 and every value is finite."""
        x = self._check_emb(emb)
        n = x.shape[0]
        if n < 1:
            raise ValueError("emb must have at least one row")
        check_points("emb", x)
        name, dev, why = resolve_kmeans_backend(self.backend, self.device)
        self.backend_used = f"{name} on {dev}"
        if self.verbose:
            print(f"RQKMeans: {why}")
        r = x.to(dev if name == "torch" else "cpu", torch.float32)
        self.codebooks, cols = [], []
        for lvl, k in enumerate(self.requested_sizes):
            res = kmeans(r, min(k, n), iters=self.iters, seed=self.seed + lvl, backend=name, device=dev,
                         balanced=self.balanced, max_points_per_centroid=self.max_points_per_centroid)
            self.codebooks.append(res.centroids.float().cpu())
            cols.append(res.assign)
            r = r - res.centroids[res.assign]
        codes = torch.stack(cols, 1).cpu()
        self.item_codes = disambiguate(codes, rank) if self.collisions == "extra_level" else codes
        self._stats = self._compute_stats(x.cpu().float(), codes)
        if self.verbose:
            print(self.format_stats())
        return self

    # ------------------------------------------------------------------ encode / decode
    def _check_emb(self, emb) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"emb must be a torch.Tensor [N, D], got {type(emb).__name__}")
        if emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError(f"emb must be a float [N, D] tensor, got {emb.dtype} {tuple(emb.shape)}")
        if self.fitted and emb.shape[1] != self.codebooks[0].shape[1]:
            raise ValueError(f"emb must have D={self.codebooks[0].shape[1]} columns (as fitted), got {emb.shape[1]}")
        return emb.detach()

    def _require_fit(self):
        if not self.fitted:
            raise RuntimeError("RQKMeans is not fitted: call fit() or RQKMeans.load()")

    def encode(self, emb: torch.Tensor) -> torch.Tensor:
        """``emb: float [N, D]`` -> semantic codes int64 ``[N, levels]`` (greedy residual assignment), on emb's
        device."""
        self._require_fit()
        x = self._check_emb(emb)
        r = x.float()
        cols = []
        for c in self.codebooks:
            c = c.to(r.device)
            a, _ = nearest_centroid(r, c)
            cols.append(a)
            r = r - c[a]
        return torch.stack(cols, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes: int [N, levels]`` or ``[N, levels + 1]`` (the extra level is ignored) -> float32 ``[N, D]``."""
        self._require_fit()
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer [N, levels] tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.shape[1] not in (self.levels, self.levels + 1):
            raise ValueError(f"codes must have {self.levels} or {self.levels + 1} columns, got {codes.shape[1]}")
        out = None
        for lvl, c in enumerate(self.codebooks):
            col = codes[:, lvl].long()
            if len(col) and (col.min() < 0 or col.max() >= c.shape[0]):
                raise ValueError(f"codes[:, {lvl}] must lie in [0, {c.shape[0]}), got [{col.min()}, {col.max()}]")
            v = c.to(codes.device)[col]
            out = v if out is None else out + v
        return out

    # ------------------------------------------------------------------ stats
    def _compute_stats(self, x: torch.Tensor, codes: torch.Tensor) -> dict:
        n = x.shape[0]
        total = float((x.double() ** 2).sum()) or 1.0
        recon = torch.zeros_like(x)
        per_level = []
        for lvl, c in enumerate(self.codebooks):
            k = c.shape[0]
            counts = torch.bincount(codes[:, lvl], minlength=k).double()
            p = counts[counts > 0] / n
            ent = float(-(p * p.log2()).sum())
            recon = recon + c[codes[:, lvl]]
            per_level.append({
                "level": lvl,
                "codebook_size": k,
                "used": int((counts > 0).sum()),
                "utilization": float((counts > 0).sum()) / k,
                "entropy_bits": ent,
                "entropy_norm": ent / math.log2(k) if k > 1 else 1.0,
                "recon_loss": float(((x - recon).double() ** 2).sum()) / total,
            })
        _, group = torch.unique(codes, dim=0, return_counts=True)
        return {
            "num_items": n,
            "levels": per_level,
            "recon_loss": per_level[-1]["recon_loss"],
            "collision_rate": 1.0 - group.numel() / n,
            "max_group": int(group.max()),
            "collisions": self.collisions,
            "backend": self.backend_used,
        }

    def stats(self) -> dict:
        """Per-level utilization, entropy and reconstruction loss, and the collision rate, on the fitted items."""
        self._require_fit()
        if self._stats is None:
            raise RuntimeError("stats are computed by fit(); this model was loaded without them")
        return self._stats

    def format_stats(self) -> str:
        s = self.stats()
        lines = [f"RQ-KMeans on {s['num_items']} items ({s['backend']}):",
                 f"{'level':>5} {'size':>6} {'used':>6} {'util':>6} {'entropy':>8} {'ent/max':>7} {'recon':>7}"]
        for lv in s["levels"]:
            lines.append(f"{lv['level']:>5} {lv['codebook_size']:>6} {lv['used']:>6} {lv['utilization']:>6.3f} "
                         f"{lv['entropy_bits']:>8.3f} {lv['entropy_norm']:>7.3f} {lv['recon_loss']:>7.4f}")
        extra = (f"; extra level of {self.codebook_sizes[-1]} codes makes every item unique"
                 if self.collisions == "extra_level" else "; collisions kept (policy 'none')")
        lines.append(f"collision rate {s['collision_rate']:.4f} (largest group {s['max_group']}){extra}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {"format": _FORMAT, "levels": self.levels, "requested_sizes": self.requested_sizes,
                "backend": self.backend, "seed": self.seed, "balanced": self.balanced, "iters": self.iters,
                "collisions": self.collisions, "max_points_per_centroid": self.max_points_per_centroid,
                "backend_used": self.backend_used, "stats": self._stats}

    def save(self, path: str | Path) -> None:
        """Write codebooks, item codes and config. ``*.safetensors`` uses safetensors; any other suffix
        ``torch.save`` of plain tensors + a JSON string (loadable with ``weights_only=True``)."""
        self._require_fit()
        path = Path(path)
        tensors = {f"codebook.{i}": c.contiguous() for i, c in enumerate(self.codebooks)}
        tensors["item_codes"] = self.item_codes.contiguous()
        cfg = json.dumps(self._config())
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata={"config": cfg})
        else:
            torch.save({"tensors": tensors, "config": cfg}, path)

    @classmethod
    def load(cls, path: str | Path, verbose: bool = False) -> "RQKMeans":
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                cfg = json.loads(f.metadata()["config"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            tensors, cfg = blob["tensors"], json.loads(blob["config"])
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an RQKMeans file (format {cfg.get('format')!r}, expected {_FORMAT!r})")
        self = cls(levels=cfg["levels"], codebook_size=cfg["requested_sizes"], backend=cfg["backend"],
                   seed=cfg["seed"], balanced=cfg["balanced"], iters=cfg["iters"], collisions=cfg["collisions"],
                   max_points_per_centroid=cfg["max_points_per_centroid"], verbose=verbose)
        self.codebooks = [tensors[f"codebook.{i}"].float() for i in range(cfg["levels"])]
        self.item_codes = tensors["item_codes"].long()
        self.backend_used, self._stats = cfg["backend_used"], cfg["stats"]
        return self
