"""Post-training on the synthetic world: pretraining -> RSFT -> ECPO, scored against the true preference.

    python benchmarks/posttrain_table.py [--out posttrain_out] [--device cpu] [--quick]

Pipeline (CPU-sized defaults: 9 minutes measured on a shared, loaded 2-core machine; ``--quick`` in 3):

1. the synthetic world (``onerec_fast.data.synthetic``), whose ``true_reward`` is the expected watch ratio of a
   (user, item) pair at the users' current interests;
2. item embeddings (content fused with collaborative vectors) -> RQ-KMeans semantic ids;
3. pretraining of the ``tiny`` OneRec on every training target;
4. RSFT: fine-tuning on the training targets that survive dropping the bottom 50% by playtime;
5. ECPO with the P-Score reward model (trained on the logged engagement, never on the truth) as the reward,
   the format reward, and the next-token loss.

After stages 3-5 the policy is scored on the test contexts of ``--eval-users`` users:

* ``true reward (sampled)``: mean true reward of the real items among ``G`` unconstrained samples per user;
* ``legality``: the share of those unconstrained samples that are real items;
* ``true reward (top-10)``: mean true reward of the top 10 of trie-constrained beam search.

It prints one table (and writes it to ``<out>/posttrain_table.md``), and ``<out>/rl/rl_reward.png`` (reward
and legality over RL steps) when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from onerec_fast.data.batch import UserSequenceDataset
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset
from onerec_fast.rl import PScoreModel, PScoreReward, TableReward, rsft_subset, train_pscore
from onerec_fast.rl.loop import ECPOTrainer, RLConfig, evaluate_policy
from onerec_fast.train.pipeline import prepare
from onerec_fast.train.pretrain import Trainer, TrainConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="posttrain_out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--codebook", type=int, default=16, help="codes per RQ-KMeans level")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--rsft-steps", type=int, default=100)
    p.add_argument("--rl-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--users-per-round", type=int, default=32,
                   help="users per RL round (the loop's default is 1%% of users; small worlds need more)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--format-weight", type=float, default=0.3,
                   help="weight of the format loss (1.0 sharpened the policy too fast in our runs)")
    p.add_argument("--eval-users", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--reward", choices=("pscore", "true"), default="pscore",
                   help="the ECPO reward: the P-Score model (default) or the world's true reward (an oracle)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.items, args.pretrain_steps, args.rsft_steps, args.rl_steps = 120, 200, 40, 10, 10
        args.eval_users, args.eval_every = 60, 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    t_start = time.perf_counter()

    prep = prepare("synthetic", seed=args.seed, codebook_size=args.codebook, short_len=20, positive_len=64,
                   lifelong_len=256, emb_dim=32, splits=("train", "test"),
                   synthetic={"num_users": args.users, "num_items": args.items, "median_history": 40,
                              "max_history": 250, "heavy_user_frac": 0.0})
    log, world, codes, emb = prep.log, prep.world, prep.item_codes, prep.item_emb
    train_ds, test_ds = prep.datasets["train"], prep.datasets["test"]
    rl_ds = UserSequenceDataset(log, codes, "train", item_emb=emb,
                                config=dataclasses.replace(prep.batch_config, train_targets="last"))
    eval_idx = np.random.default_rng(args.seed).permutation(len(test_ds))[: args.eval_users]

    truth = TableReward(torch.tensor(world.true_reward_matrix(np.arange(log.num_users)), dtype=torch.float32))

    def score(model, seed=1234) -> dict:
        return evaluate_policy(model, test_ds, truth, indices=eval_idx, group_size=16, top_k=10, seed=seed,
                               device=device)

    cfg = OneRecConfig.preset("tiny", **features_from_dataset(train_ds, codes))
    model = OneRec(cfg, codes)
    rows = {}

    # ---- pretraining
    Trainer(model, train_ds, TrainConfig(steps=args.pretrain_steps, batch_size=args.batch_size, lr=3e-3,
                                         warmup_steps=max(1, args.pretrain_steps // 10), seed=args.seed),
            device=device, out_dir=out / "pretrain").train()
    rows["pretrained"] = score(model)
    print("after pretraining:", rows["pretrained"])

    # ---- RSFT: the top half of the training targets by playtime
    rsft = rsft_subset(train_ds, field="playtime", quantile=0.5)
    print(f"RSFT keeps {len(rsft)} of {len(train_ds)} training targets")
    Trainer(model, rsft, TrainConfig(steps=args.rsft_steps, batch_size=args.batch_size, lr=1e-3,
                                     warmup_steps=max(1, args.rsft_steps // 10), seed=args.seed + 1),
            device=device, out_dir=out / "rsft").train()
    rows["+ RSFT"] = score(model)
    print("after RSFT:", rows["+ RSFT"])

    # ---- the reward: P-Score trained on logged engagement only
    if args.reward == "pscore":
        # the fusion target weighs watch ratio 4x each label (and the logged-vs-random "interact" tower)
        pscore = PScoreModel.from_log(log, objectives=["watch_ratio", "like", "follow", "forward", "comment"],
                                      negatives=1, fusion_weights=[4, 1, 1, 1, 1, 1]).to(device)
        losses = train_pscore(pscore, log, epochs=4, batch_size=2048, lr=3e-3, seed=args.seed)
        pscore.save(out / "pscore.pt")
        reward = PScoreReward(pscore)
        u = torch.arange(log.num_users).repeat_interleave(log.num_items)
        i = torch.arange(log.num_items).repeat(log.num_users)
        corr = np.corrcoef(pscore.score(u.to(device), i.to(device)).cpu().numpy(),
                           truth.table.flatten().numpy())[0, 1]
        print(f"P-Score: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; "
              f"correlation with the true reward over all pairs {corr:.3f}")
    else:
        reward = truth

    # ---- ECPO
    rl_cfg = RLConfig(steps=args.rl_steps, users_per_round=args.users_per_round, group_size=args.group_size,
                      lr=args.rl_lr, format_k=args.group_size // 2, format_weight=args.format_weight,
                      eval_every=args.eval_every, seed=args.seed)
    ECPOTrainer(model, rl_ds, reward, rl_cfg, device=device, out_dir=out / "rl",
                eval_fn=lambda m: score(m, seed=99)).train()
    rows["+ ECPO"] = score(model)
    print("after ECPO:", rows["+ ECPO"])

    table = ["| stage | true reward (sampled) | legality (unconstrained) | true reward (top-10 beam) |",
             "|---|---|---|---|"]
    table += [f"| {k} | {v['reward']:.4f} | {v['legality']:.4f} | {v['reward_top']:.4f} |" for k, v in rows.items()]
    rand = float(truth.table.mean())
    footer = (f"synthetic world: {log.num_users} users, {log.num_items} items, {len(log)} interactions; "
              f"{len(eval_idx)} evaluation users, 16 samples each; ECPO reward: {args.reward}; mean true reward "
              f"of a uniformly random item {rand:.4f}; total {time.perf_counter() - t_start:.0f} s on {device}")
    text = "\n".join(table) + "\n\n" + footer + "\n"
    print("\n" + text)
    (out / "posttrain_table.md").write_text(text)
    (out / "posttrain_table.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
