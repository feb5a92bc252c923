"""Two properties of a tokenization, for the fused item vectors and for their mean over co-occurring items
(``neighbour_mean``):

* predictability: the cross-entropy (nats) of the test target's depth-1 and depth-2 prefix given the prefix of the
  user's newest item, from a bigram table of consecutive training items (add-0.1 smoothing), over all test users and
  over those whose target has at most 5 training interactions. Lower: the next item's codes follow more from the
  last one's, as the decoder has to learn;
* popularity given away: the share of the variance of log(1 + training count) that the depth-1/2 prefixes explain
  (eta^2), against shuffled codes.

    python benchmarks/diagnostics/code_predictability.py --data ../shared/data/amazon-sports/sequences.txt

Measurements: docs/ARCHITECTURE.md, "Semantic IDs from co-occurring items".
"""

from __future__ import annotations

import argparse

import numpy as np


def prefix_eta2(codes: np.ndarray, y: np.ndarray, depth: int) -> float:
    """Share of the variance of ``y: [I]`` explained by the mean of ``y`` within each depth-``depth`` prefix of
    ``codes: int [I, L]`` (1: the prefix fixes ``y``; 0: prefixes carry no information about ``y``)."""
    group = prefix_ids(codes, depth)
    mean = np.bincount(group, weights=y) / np.bincount(group)
    total = ((y - y.mean()) ** 2).sum()
    return float(1.0 - ((y - mean[group]) ** 2).sum() / total) if total > 0 else 0.0


def prefix_ids(codes: np.ndarray, depth: int) -> np.ndarray:
    """int64 ``[I]``: a dense id of each item's depth-``depth`` prefix."""
    return np.unique(codes[:, :depth], axis=0, return_inverse=True)[1].ravel()


def bigram_cross_entropy(group: np.ndarray, train_src: np.ndarray, train_dst: np.ndarray, src: np.ndarray,
                         dst: np.ndarray, smoothing: float = 0.1) -> np.ndarray:
    """Per pair ``(src[i], dst[i])`` of item ids: ``-log p(group[dst] | group[src])`` from the counts of the
    training pairs ``(train_src, train_dst)``, each row smoothed by ``smoothing`` per group. ``group: [I]``."""
    k = int(group.max()) + 1
    table = np.full((k, k), smoothing)
    np.add.at(table, (group[train_src], group[train_dst]), 1.0)
    logp = np.log(table / table.sum(1, keepdims=True))
    return -logp[group[src], group[dst]]


def main(argv=None) -> int:
    from onerec_fast.data.sources import load_source
    from onerec_fast.tokenizer import fuse_item_embeddings
    from onerec_fast.train.baselines import train_counts, train_rows
    from onerec_fast.train.pipeline import item_codes_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, default=3)
    a = p.parse_args(argv)
    log, _ = load_source(a.data, seed=a.seed)
    log.sort_()
    counts = train_counts(log)
    y = np.log1p(counts.astype(np.float64))
    train = train_rows(log)
    pair = (log.user[1:] == log.user[:-1]) & train[1:]  # consecutive items, both in the training part
    train_src, train_dst = log.item[:-1][pair], log.item[1:][pair]
    end = log.user_offsets()[1:][np.diff(log.user_offsets()) >= 3]  # users with a test target
    src, dst = log.item[end - 2], log.item[end - 1]  # each test user's newest item and target
    rare = counts[dst] <= 5
    shuffle = np.random.default_rng(a.seed).permutation(len(y))
    for neighbour_mean in (False, True):
        emb, _ = fuse_item_embeddings(log, dim=64, seed=a.seed, neighbour_mean=neighbour_mean)
        codes = item_codes_for(log, emb, levels=a.levels, seed=a.seed).item_codes.numpy()
        ce = {d: bigram_cross_entropy(prefix_ids(codes, d), train_src, train_dst, src, dst) for d in (1, 2)}
        print(f"neighbour_mean={neighbour_mean}: test target prefix cross-entropy given the newest item's, depth 1/2 "
              f"(nats): all {[round(float(ce[d].mean()), 3) for d in (1, 2)]}, target count <= 5 "
              f"{[round(float(ce[d][rare].mean()), 3) for d in (1, 2)]} (log #prefixes "
              f"{[round(float(np.log(prefix_ids(codes, d).max() + 1)), 2) for d in (1, 2)]}); eta^2 of "
              f"log(1 + count) by prefix {[round(prefix_eta2(codes, y, d), 3) for d in (1, 2)]}, shuffled "
              f"{[round(prefix_eta2(codes[shuffle], y, d), 3) for d in (1, 2)]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
