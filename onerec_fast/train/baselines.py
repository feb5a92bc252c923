"""Baselines evaluated next to OneRec on the same leave-one-out split: most-popular and a SASRec-style model.

Split (the one ``onerec_fast.data.UserSequenceDataset`` uses): users with >= 3 interactions have their last
item as the test target and the second-to-last as the validation target; training sees only the earlier
rows (all rows of users with fewer than 3). At test time a model reads the whole history before the test
item (validation item included), as OneRec's test samples do.

* :func:`popularity_topk`: the items with most training interactions, the same list for everyone.
* :class:`SASRec` (Kang & McAuley 2018, with a full-softmax loss instead of one sampled negative, which makes
  it much stronger than the published SASRec numbers): item + learned position embeddings, causal pre-norm
  transformer blocks, scores = last state . item embeddings; trained with early stopping on the validation
  targets (the split OneRec selects its checkpoint on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onerec_fast.train.progress import ProgressBar

__all__ = ["train_rows", "train_counts", "popularity_topk", "SASRec", "SASRecConfig", "train_sasrec", "sasrec_topk"]


def train_rows(log) -> np.ndarray:
    """bool ``[E]``: rows that are training interactions (not a user's validation or test target)."""
    offsets = log.user_offsets()
    lens = np.diff(offsets)
    keep = np.ones(len(log), dtype=bool)
    full = np.flatnonzero(lens >= 3)
    keep[offsets[full + 1] - 1] = False
    keep[offsets[full + 1] - 2] = False
    return keep


def train_counts(log) -> np.ndarray:
    """int64 ``[I]``: training interactions per item (:func:`train_rows`)."""
    return np.bincount(log.item[train_rows(log)], minlength=log.num_items)


def popularity_topk(log, k: int) -> torch.Tensor:
    """int64 ``[k]``: the ``k`` items with most training interactions (ties: lower item id)."""
    counts = train_counts(log)
    order = np.lexsort((np.arange(log.num_items), -counts))
    return torch.from_numpy(order[:k].astype(np.int64))


@dataclass
class SASRecConfig:
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    epochs: int = 200  # at most; early stopping on the validation split usually ends it well before
    patience: int = 10  # epochs without a better validation NDCG@10
    batch_size: int = 128
    seed: int = 0


class SASRec(nn.Module):
    """Causal self-attentive sequential recommender over item ids (0 is padding; item ``i`` is token ``i+1``)."""

    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # Small item embeddings: they double as the output layer, so N(0, 1) would start with huge logits.
        nn.init.normal_(self.item_emb.weight, std=cfg.d_model ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq: int64 [B, max_len]`` tokens, left-padded with 0 -> states ``[B, max_len, d]``."""
        n = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.cfg.d_model) + self.pos_emb.weight[:n]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=seq.device), 1)
        # Left padding (token 0, zero embedding) stays visible as keys, as in SASRec: with the causal mask
        # every row keeps at least one key, and real positions learn to ignore the padding.
        h = self.blocks(self.drop(x), mask=causal)
        return self.norm(h)

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> ``[..., num_items]`` (padding token excluded)."""
        return states @ self.item_emb.weight[1:].t()


def _windows(log, rows: np.ndarray, max_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token windows ``[N, max_len]`` and targets: for ``"train"``, consecutive windows of
    ``max_len + 1`` items of each user's training rows (input = first max_len, target = shifted by one);
    for ``"valid"`` / ``"test"``, the ``max_len`` items before each user's validation / test target (users
    with >= 3 interactions, in user order)."""
    offsets = log.user_offsets()
    seqs, tgts = [], []
    for u in range(log.num_users):
        a, b = offsets[u], offsets[u + 1]
        if split != "train":
            if b - a < 3:
                continue
            end = b - 1 if split == "test" else b - 2
            hist = log.item[a:end][-max_len:] + 1
            seqs.append(np.pad(hist, (max_len - len(hist), 0)))
            tgts.append(np.array([log.item[end]]))
            continue
        items = log.item[a:b][rows[a:b]] + 1
        for end in range(len(items), 1, -max_len):
            w = items[max(0, end - max_len - 1):end]
            inp, out = w[:-1], w[1:] - 1
            pad = max_len - len(inp)
            seqs.append(np.pad(inp, (pad, 0)))
            tgts.append(np.pad(out, (pad, 0), constant_values=-100))
    if not seqs:
        raise ValueError(f"no {split} sequences: every user has fewer than 3 interactions")
    return np.stack(seqs).astype(np.int64), np.stack(tgts).astype(np.int64)


def train_sasrec(log, cfg: SASRecConfig | None = None, device="cpu", show_progress: bool = True) -> SASRec:
    """Train a :class:`SASRec` on the training rows of ``log`` (full-softmax next-item loss), with early
    stopping on the validation targets (the same split OneRec selects on): NDCG@10 over all items after every
    epoch; after ``cfg.patience`` epochs without a better one (or ``cfg.epochs``) the best epoch's weights are
    kept. ``model.selection`` records the best epoch and its validation metrics."""
    from onerec_fast.train.evaluate import rank_metrics

    cfg = cfg or SASRecConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    seqs, tgts = (torch.from_numpy(a).to(device) for a in _windows(log, train_rows(log), cfg.max_len, "train"))
    model = SASRec(log.num_items, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    n = seqs.shape[0]
    bar = ProgressBar(cfg.epochs, "SASRec epochs") if show_progress else None
    best, best_state, since = None, None, 0
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            s, t = seqs[idx], tgts[idx]
            keep = t != -100  # score only positions with a target (left padding has none)
            loss = F.cross_entropy(model.scores(model(s)[keep]), t[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        top, target = sasrec_topk(model, log, 10, device=device, split="valid")
        res = rank_metrics(top, target, (10,))
        if best is None or res["ndcg@10"] > best["ndcg@10"]:
            best, since = {"epoch": epoch + 1, **res}, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
        if bar is not None:
            bar.update(1, loss=loss.item(), **{"valid ndcg@10": res["ndcg@10"], "best epoch": best["epoch"]})
        if since >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.selection = best
    return model.eval()


@torch.no_grad()
def sasrec_topk(model: SASRec, log, k: int, device="cpu", batch_size: int = 512,
                split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(top-``k`` items ``[U', k]``, targets ``[U']``) of the ``"test"`` (or ``"valid"``) split, for the users
    with >= 3 interactions, in user order."""
    seqs, tgts = (torch.from_numpy(a) for a in _windows(log, train_rows(log), model.cfg.max_len, split))
    model.eval()
    out = []
    for i in range(0, seqs.shape[0], batch_size):
        states = model(seqs[i:i + batch_size].to(device))[:, -1]
        out.append(model.scores(states).topk(k, dim=-1).indices.cpu())
    return torch.cat(out), tgts[:, 0]
