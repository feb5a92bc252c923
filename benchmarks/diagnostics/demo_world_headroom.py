"""How much next-item signal the demo's synthetic world holds: Recall@10 of the test targets (each user's last
item) under rankings that need no training, next to what the models reach (benchmarks/RESULTS.md).

    python benchmarks/diagnostics/demo_world_headroom.py [--size cpu]

* popularity: training-interaction counts (the demo's popularity baseline);
* tag frequency: log popularity + alpha * log(share of the user's history with the item's tag + 0.02);
* oracle: the logging policy's own choice probability at the users' final interest state (hidden world state),
  averaged over each user's interests: pop(i) * exp(sharpness * <u, v_i> + q_i), normalized per interest.
"""

from __future__ import annotations

import argparse

import numpy as np


def recall_at_10(scores: np.ndarray, target: np.ndarray) -> float:
    """Share of rows whose target item has fewer than 10 items scored strictly above it."""
    rank = (scores > scores[np.arange(len(target)), target][:, None]).sum(1)
    return float((rank < 10).mean())


def main(argv=None) -> int:
    from onerec_fast.data.synthetic import make_synthetic_world
    from onerec_fast.train.cli_demo import demo_world_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="cpu", choices=("small", "cpu", "gpu"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    w = make_synthetic_world(seed=a.seed, **demo_world_config(a.size))
    log, c = w.log, w.config
    off = log.user_offsets()
    users = np.flatnonzero(np.diff(off) >= 3)
    target = log.item[off[users + 1] - 1]
    train = np.zeros(log.num_items)
    for u in users:
        np.add.at(train, log.item[off[u]:off[u + 1] - 2], 1)
    logpop = np.log(train + 1)
    print(f"demo world ({a.size}, seed {a.seed}): {len(users)} test users, {log.num_items} items")
    print(f"popularity        Recall@10 {recall_at_10(np.broadcast_to(train, (len(users), log.num_items)), target):.4f}")
    tag = log.item_features["tag"]
    share = np.stack([np.bincount(tag[log.item[off[u]:off[u + 1] - 1]], minlength=c.num_topics) / (off[u + 1] - 1 - off[u])
                      for u in users])
    for alpha in (1.0, 2.0):
        s = logpop[None, :] + alpha * np.log(share[:, tag] + 0.02)
        print(f"tag frequency a={alpha:.0f} Recall@10 {recall_at_10(s, target):.4f}")
    logits = c.sharpness * np.einsum("ukd,id->uki", w.user_interests[users], w.item_vec) + w.item_quality
    prob = np.exp(logits - logits.max(2, keepdims=True)) * w.item_pop
    prob = (prob / prob.sum(2, keepdims=True)).mean(1)
    print(f"oracle            Recall@10 {recall_at_10(prob, target):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
