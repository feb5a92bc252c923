"""Recall@10 by how often the target was seen in training, on the validation and test splits: does a model lose
on rare targets? A trained OneRec (its own semantic IDs, trie-constrained beam search) and, with ``--sasrec``, the
SASRec-style baseline trained here on the same split.

    python benchmarks/diagnostics/by_target_popularity.py --checkpoint runs/x/best.pt --data ../shared/data/ml-100k
    python benchmarks/diagnostics/by_target_popularity.py --checkpoint R/best.pt --data D --beam 2048 --sasrec
    python benchmarks/diagnostics/by_target_popularity.py --checkpoint R/best.pt --data D --levels

Buckets: training count 0-5 (before 2026-12-07: 1-5), 6-10, 11-20, 21-50, above 50 (``[recall, targets]`` per
bucket). A beam at least as wide as the number of prefixes at every level keeps every prefix, so the search is
exact: comparing it with the default beam separates what the search prunes from what the model ranks low.
``--levels``: per bucket and code level, the teacher-forced log-probability of the target's code and its median
rank among the valid children of its prefix: at which level a model loses the rare targets.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

EDGES = (-1, 5, 10, 20, 50)  # bucket (lo, hi]; the first holds count 0 (items seen only in held-out positions)


def recall_by_count(counts: np.ndarray, top: torch.Tensor, target: torch.Tensor) -> dict:
    """``{"<=5": [recall@k, targets], ..., ">50": [...], "all": recall@k}`` of ``top: [U, k]`` item ids against
    ``target: [U]``, bucketed by ``counts[target]`` (training interactions per item)."""
    hit = (top == target[:, None]).any(1).numpy()
    out = {name: [round(float(hit[sel].mean()), 4) if sel.any() else None, int(sel.sum())]
           for name, sel in bucket_masks(counts[target.numpy()]).items()}
    out["all"] = round(float(hit.mean()), 4)
    return out


def bucket_masks(c: np.ndarray) -> dict[str, np.ndarray]:
    """bool ``[U]`` per bucket of training counts ``c: [U]`` (the names of :func:`recall_by_count`)."""
    return {f"<={hi}" if hi is not None else f">{lo}": (c > lo) & (c <= hi) if hi is not None else c > lo
            for lo, hi in zip(EDGES, (*EDGES[1:], None))}


@torch.no_grad()
def level_ranks(model, dataset, counts: np.ndarray, device, batch_size: int = 256) -> dict:
    """Per bucket of the target's training count: ``[mean log-prob per level, median rank per level, users]`` of
    the target's code among the valid children of its prefix (teacher forcing, the trie-normalized softmax)."""
    model.eval().to(device)
    logp, rank, target = [], [], []
    for i in range(0, len(dataset), batch_size):
        b = dataset.batch(np.arange(i, min(i + batch_size, len(dataset)))).to(device)
        lp = [lg.float().masked_fill(~m, float("-inf")).log_softmax(-1)
              for lg, m in zip(model.code_logits(b), model.prefix_masks(b.target_codes))]
        true = torch.stack([x.gather(1, b.target_codes[:, t:t + 1])[:, 0] for t, x in enumerate(lp)], 1)
        logp.append(true.cpu())
        rank.append(torch.stack([(x > true[:, t:t + 1]).sum(1) for t, x in enumerate(lp)], 1).float().cpu())
        target.append(b.target_item.cpu())
    logp, rank, c = torch.cat(logp), torch.cat(rank), counts[torch.cat(target).numpy()]
    return {name: [[round(v, 2) for v in logp[sel].mean(0).tolist()], rank[sel].median(0).values.int().tolist(),
                   int(sel.sum())]
            for name, sel in (*bucket_masks(c).items(), ("all", np.ones(len(c), bool))) if sel.any()}


def main(argv=None) -> int:
    from onerec_fast.data import BatchConfig
    from onerec_fast.data.sources import load_source
    from onerec_fast.train.baselines import SASRecConfig, sasrec_topk, train_counts, train_sasrec
    from onerec_fast.train.checkpoint import load_checkpoint
    from onerec_fast.train.cli_common import model_from_checkpoint
    from onerec_fast.train.evaluate import onerec_topk, rank_metrics
    from onerec_fast.train.pipeline import datasets_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=0, help="the seed of the baseline (the split does not depend on it)")
    p.add_argument("--beam", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256, help="users per generate call")
    p.add_argument("--sasrec", action="store_true", help="also train the SASRec-style baseline and bucket it")
    p.add_argument("--levels", action="store_true", help="also the per-level log-probability and rank by bucket")
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_from_checkpoint(load_checkpoint(a.checkpoint))
    cfg = model.cfg
    log, _ = load_source(a.data, seed=a.seed)
    counts = train_counts(log)
    bc = BatchConfig(short_len=cfg.short_len, positive_len=cfg.pos_len, lifelong_len=cfg.lifelong_len)
    # The model's own codes, so a checkpoint tokenized from other item vectors is read correctly.
    datasets = datasets_for(log, model.item_codes.cpu(), None, bc, ("valid", "test"))
    for split, ds in datasets.items():
        top, target, _, _ = onerec_topk(model, ds, 10, a.beam, a.batch_size, dev, show_progress=False)
        m = rank_metrics(top, target, (10,))
        print(f"OneRec {split} beam {a.beam}: Recall@10 {m['recall@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} "
              + json.dumps(recall_by_count(counts, top, target)), flush=True)
        if a.levels:
            print(f"OneRec {split} per level [mean log-prob, median rank, users]: "
                  + json.dumps(level_ranks(model, ds, counts, dev)), flush=True)
    if a.sasrec:
        sas = train_sasrec(log, SASRecConfig(seed=a.seed), device=dev, show_progress=False)
        for split in ("valid", "test"):
            top, target = sasrec_topk(sas, log, 10, device=dev, split=split)
            m = rank_metrics(top, target, (10,))
            print(f"SASRec-style {split}: Recall@10 {m['recall@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} "
                  + json.dumps(recall_by_count(counts, top, target)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
