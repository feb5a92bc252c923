"""Leave-one-out evaluation: Recall@K and NDCG@K over all items, OneRec next to its baselines.

Every user with >= 3 interactions contributes one test case: its last item, predicted from everything
before it. With one relevant item, Recall@K is the hit rate (target among the top K) and NDCG@K is
``1 / log2(rank + 2)`` for a hit at 0-based rank ``rank`` (0 otherwise). Nothing is filtered out of the
ranking (the full catalogue, seen items included), identically for every method.

OneRec ranks by trie-constrained beam search (``OneRec.generate``); its *legality rate* is the fraction of
returned slots holding the codes of a real item (1.0 by construction of the constrained search, unless
fewer than K items are reachable). The popularity and SASRec-style baselines come from
:mod:`onerec_fast.train.baselines`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from onerec_fast.train.progress import ProgressBar

__all__ = ["rank_metrics", "onerec_topk", "evaluate_onerec", "evaluate_all", "sasrec_metrics", "baseline_cache_dir", "format_table"]


def rank_metrics(topk: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """``topk: int64 [U, K]`` ranked items (-1 = empty slot), ``target: int64 [U]`` -> mean Recall@k and
    NDCG@k for each k in ``ks`` (k <= K)."""
    if topk.dim() != 2 or target.shape != (topk.shape[0],):
        raise ValueError(f"topk must be [U, K] and target [U], got {tuple(topk.shape)} and {tuple(target.shape)}")
    if max(ks) > topk.shape[1]:
        raise ValueError(f"ks {ks} need at least {max(ks)} ranked items, got {topk.shape[1]}")
    hit = topk == target[:, None]  # [U, K]; at most one True per row (items are distinct)
    rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(target, topk.shape[1]))
    out = {}
    for k in ks:
        inside = rank < k
        out[f"recall@{k}"] = inside.float().mean().item()
        out[f"ndcg@{k}"] = torch.where(inside, 1.0 / torch.log2(rank.float() + 2), torch.zeros(())).mean().item()
    return out


@torch.no_grad()
def onerec_topk(model, dataset, k: int = 10, beam_size: int = 128, batch_size: int = 64, device="cpu",
                show_progress: bool = True, indices=None, normalize: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top-``k`` items of ``model`` for the samples of a ``UserSequenceDataset`` (``indices``: only those) by
    constrained beam search (``normalize``: as ``OneRec.generate``): (items int64 ``[U, k]`` (-1: empty slot),
    targets ``[U]``, bool ``[U * k]`` whether each slot holds a real item's codes, seconds of generation)."""
    device = torch.device(device)
    model.eval().to(device)
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    tops, targets, legal = [], [], []
    trie = model.trie(device)
    bar = ProgressBar(len(chunks), "generate") if show_progress else None
    t0 = time.perf_counter()
    for chunk in chunks:
        batch_cpu = dataset.batch(chunk)
        model.check_batch(batch_cpu)
        batch = batch_cpu.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(batch, beam_size=beam_size, num_return=k, normalize=normalize)
        codes = out.codes.flatten(0, 1)
        ok = (out.item_ids.flatten() >= 0) & trie.contains(codes.clamp_min(0))
        legal.append(ok.cpu())
        tops.append(out.item_ids.cpu())
        targets.append(batch_cpu.target_item)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.cat(tops), torch.cat(targets), torch.cat(legal), time.perf_counter() - t0


def evaluate_onerec(model, dataset, ks: tuple[int, ...] = (5, 10), beam_size: int = 128, batch_size: int = 64,
                    device="cpu", show_progress: bool = True, indices=None, normalize: str | None = None
                    ) -> dict[str, float]:
    """Metrics of ``model`` on a ``UserSequenceDataset`` (``split="test"`` or ``"valid"``; ``indices``: only
    those samples) by constrained beam search (:func:`onerec_topk`); also ``legality`` and ``users_per_s``."""
    top, target, legal, seconds = onerec_topk(model, dataset, max(ks), beam_size, batch_size, device, show_progress,
                                              indices, normalize)
    res = rank_metrics(top, target, ks)
    res["legality"] = legal.float().mean().item()
    res["users_per_s"] = target.numel() / seconds
    return res


def evaluate_all(model, test_dataset, log, ks: tuple[int, ...] = (5, 10), beam_size: int = 128,
                 batch_size: int = 64, device="cpu", sasrec_cfg=None, show_progress: bool = True,
                 cache: bool = True) -> dict[str, dict]:
    """OneRec, most-popular and SASRec-style metrics on the same users of ``test_dataset``'s split:
    ``{method: metrics}``. The SASRec-style baseline's result is cached per data split and config
    (:func:`sasrec_metrics`)."""
    from onerec_fast.train.baselines import popularity_topk

    results = {"OneRec": evaluate_onerec(model, test_dataset, ks, beam_size, batch_size, device, show_progress)}
    k = max(ks)
    targets = torch.as_tensor(log.item[test_dataset.offsets[test_dataset.sample_user] + test_dataset.sample_pos])
    pop = popularity_topk(log, k)
    results["Popularity"] = rank_metrics(pop.expand(targets.numel(), k), targets, ks)
    results["SASRec"] = sasrec_metrics(log, sasrec_cfg, ks, test_dataset.split, device, show_progress, cache)
    return results


def baseline_cache_dir() -> Path:
    """Where baseline results are cached: ``$ONEREC_FAST_CACHE_DIR/baselines`` (default ``~/.cache/onerec_fast``)."""
    root = os.environ.get("ONEREC_FAST_CACHE_DIR") or Path.home() / ".cache" / "onerec_fast"
    return Path(root) / "baselines"


def sasrec_metrics(log, cfg=None, ks: tuple[int, ...] = (5, 10), split: str = "test", device="cpu",
                   show_progress: bool = True, cache: bool = True) -> dict[str, float]:
    """Recall/NDCG@``ks`` of the SASRec-style baseline (:func:`~onerec_fast.train.baselines.train_sasrec`) on
    ``split``, plus its selected ``epoch``. The result is cached in :func:`baseline_cache_dir` under a key of
    the interactions (users, items, order), the config and the split, so a second ``evaluate`` of the same data
    does not retrain it; what happens is announced on stdout."""
    from onerec_fast.train.baselines import SASRecConfig, sasrec_topk, train_sasrec

    cfg = cfg or SASRecConfig()
    h = hashlib.sha256()
    for a in (log.user, log.item, log.timestamp):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    h.update(json.dumps({"cfg": dataclasses.asdict(cfg), "ks": list(ks), "split": split, "protocol": 1},
                        sort_keys=True).encode())
    path = baseline_cache_dir() / f"sasrec-{h.hexdigest()[:24]}.json"
    if cache and path.is_file():
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):  # a damaged cache entry is retrained, not trusted
            res = None
        if isinstance(res, dict) and all(isinstance(v, (int, float)) for v in res.values()):
            print(f"SASRec-style baseline: cached result for this data split ({path})")
            return res
    print(f"SASRec-style baseline: training on the same split ({log.num_items} items, full softmax, early "
          f"stopping on the validation targets, up to {cfg.epochs} epochs)" + (f"; cached in {path}" if cache else ""))
    t0 = time.perf_counter()
    sas = train_sasrec(log, cfg, device=device, show_progress=show_progress)
    top, targets = sasrec_topk(sas, log, max(ks), device=device, split=split)
    sel = sas.selection  # the selected epoch and its validation metrics (to compare with OneRec's valid -> test drop)
    res = {**rank_metrics(top, targets, ks), "epoch": sel["epoch"], "valid_recall@10": sel["recall@10"],
           "valid_ndcg@10": sel["ndcg@10"], "train_s": time.perf_counter() - t0}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path)
    return res


def format_table(results: dict[str, dict], ks: tuple[int, ...] = (5, 10)) -> str:
    """A fixed-width table: one row per method, Recall/NDCG at each k, legality where known."""
    cols = [m for k in ks for m in (f"recall@{k}", f"ndcg@{k}")] + ["legality"]
    head = f"{'method':<12}" + "".join(f"{c:>11}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = "".join(f"{r[c]:>11.4f}" if c in r else f"{'-':>11}" for c in cols)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)
