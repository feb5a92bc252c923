"""``onerec-fast rl``: post-train a pretrained OneRec checkpoint with (optional) RSFT, then ECPO.

The checkpoint of ``onerec-fast train`` records its data source, pathway lengths and item embeddings, so the
same users and catalogue come back (``--data`` overrides the source). Example (P-Score reward trained on the logs)::

    onerec-fast train --out runs/train --steps 1000
    onerec-fast rl --checkpoint runs/train/checkpoint.pt --out runs/rl \\
        --rsft-steps 200 --steps 300 --users-per-round 64 --viral-alpha 0.5 --viral-share 0.02

Writes ``<out>/rl_metrics.jsonl``, ``<out>/rl_checkpoint.pt`` (``--resume`` continues it; it keeps the train
checkpoint's data record, so ``onerec-fast evaluate --checkpoint <out>/rl_checkpoint.pt`` works), ``<out>/pscore.pt``
and ``<out>/rl_reward.png`` (with matplotlib). On the synthetic world the true reward and the legality rate are
evaluated before, during (``--eval-every``) and after the run.

Under torchrun (``torchrun --nproc-per-node N -m onerec_fast.cli rl ... [--parallel fsdp]``) every rank loads the
checkpoint and the data, the P-Score model is trained on every rank and rank 0's weights are copied to all, RSFT
and ECPO are data parallel (each rank its share of the batch / of each round's users), the checkpoint is
``<out>/rl_checkpoint.dcp``, and rank 0 alone prints, evaluates and writes the metrics, the plot and ``pscore.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from onerec_fast.cli_args import non_negative_int, number, positive_int

__all__ = ["add_arguments", "run", "new_author_mask"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from onerec_fast.rl.loop import RLConfig
    from onerec_fast.train.cli_common import add_device_arguments

    d = RLConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True,
                   help="a checkpoint of onerec-fast train or of a previous rl run: a .pt file, a .dcp folder, or "
                        "a run folder (its best, else its checkpoint)")
    g.add_argument("--data", default=None, help="override the data source recorded in the checkpoint")
    g.add_argument("--out", default="runs/rl")
    add_device_arguments(g)
    g.add_argument("--resume", default=None, help="an rl_checkpoint.pt (or .dcp) to continue")
    g.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: DDP (replicated model) or FSDP2 (sharded); ignored in one process")

    g = p.add_argument_group("reward")
    g.add_argument("--reward", choices=("pscore", "true"), default="pscore",
                   help="P-Score model trained on the logs (default), or the synthetic world's true reward (oracle)")
    g.add_argument("--pscore", default=None, help="a saved P-Score model (default: train one on the logs)")
    g.add_argument("--pscore-epochs", type=positive_int, default=2)
    g.add_argument("--viral-alpha", type=number(float, min=0.0), default=0.0,
                   help="viral-content control: scale rewards of over-exposed items by this (0: off)")
    g.add_argument("--viral-share", type=number(float, min=0.0, max=1.0), default=0.02, help="exposure share above which an item is viral")
    g.add_argument("--new-author-boost", type=number(float, min=0.0), default=0.0,
                   help="scale rewards of items by new authors by this factor (0: off)")
    g.add_argument("--new-author-share", type=number(float, min=0.0, max=1.0), default=0.1,
                   help="new authors: this share of authors, by latest first appearance in the log")

    g = p.add_argument_group("RSFT (before ECPO)")
    g.add_argument("--rsft-steps", type=non_negative_int, default=0, help="fine-tuning steps on the filtered sessions (0: skip)")
    g.add_argument("--rsft-field", default=None, help="engagement column ranked (default: playtime-like)")
    g.add_argument("--rsft-quantile", type=number(float, min=0.0, max=1.0), default=0.5, help="fraction of sessions dropped")
    g.add_argument("--rsft-lr", type=number(float, min=0.0, min_open=True), default=1e-3)
    g.add_argument("--batch-size", type=positive_int, default=64, help="RSFT batch size")

    g = p.add_argument_group("ECPO")
    g.add_argument("--steps", type=positive_int, default=d.steps)
    g.add_argument("--user-fraction", type=number(float, min=0.0, max=1.0, min_open=True), default=d.user_fraction)
    g.add_argument("--users-per-round", type=non_negative_int, default=d.users_per_round, help="> 0 overrides --user-fraction")
    g.add_argument("--group-size", type=positive_int, default=d.group_size)
    g.add_argument("--generation", choices=("sample", "beam"), default=d.generation)
    g.add_argument("--temperature", type=number(float, min=0.0, min_open=True), default=d.temperature)
    g.add_argument("--constrained", action="store_true", help="sample only trie-valid codes")
    g.add_argument("--format-k", type=positive_int, default=d.format_k)
    g.add_argument("--format-weight", type=number(float, min=0.0), default=d.format_weight)
    g.add_argument("--ntp-weight", type=number(float, min=0.0), default=d.ntp_weight)
    g.add_argument("--lr", type=number(float, min=0.0, min_open=True), default=d.lr)
    g.add_argument("--eps", type=number(float, min=0.0, min_open=True), default=d.eps)
    g.add_argument("--delta", type=number(float, min=0.0), default=d.delta)
    g.add_argument("--updates-per-round", type=positive_int, default=d.updates_per_round)
    g.add_argument("--mode", choices=("single", "async"), default=d.mode)
    g.add_argument("--sync-every", type=positive_int, default=d.sync_every)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--eval-every", type=non_negative_int, default=d.eval_every)
    g.add_argument("--eval-users", type=positive_int, default=256)
    g.add_argument("--ckpt-every", type=non_negative_int, default=d.ckpt_every)


def new_author_mask(log, share: float) -> torch.Tensor:
    """bool ``[num_authors]``: the ``share`` of authors whose first interaction in the log is the latest
    (authors never seen count as newest)."""
    author = np.asarray(log.item_features["author"], dtype=np.int64)
    first = np.full(int(author.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, author[log.item], log.timestamp)
    order = np.argsort(-first, kind="stable")  # newest first
    mask = np.zeros(len(first), dtype=bool)
    mask[order[: int(round(share * len(first)))]] = True
    return torch.from_numpy(mask)


def run(args) -> int:
    from onerec_fast.train.cli_common import resolve_device
    from onerec_fast.train.parallel import run_main

    return run_main(resolve_device(args.device), lambda: _run(args))


def _run(args) -> int:
    from onerec_fast.data.batch import BatchConfig, UserSequenceDataset
    from onerec_fast.data.sources import load_source
    from onerec_fast.rl import (
        ComposedReward,
        ExposureShareCap,
        NewAuthorBoost,
        PScoreModel,
        PScoreReward,
        TableReward,
        rsft_subset,
        train_pscore,
    )
    from onerec_fast.rl.loop import ECPOTrainer, RLConfig, evaluate_policy
    from onerec_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
    from onerec_fast.train.cli_common import model_from_checkpoint, resolve_device
    from onerec_fast.train.parallel import broadcast_module, dist_info, local_device
    from onerec_fast.train.pretrain import Trainer, TrainConfig

    device = local_device(resolve_device(args.device, args.threads))
    main = dist_info().is_main
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(resolve_checkpoint(args.checkpoint))
    meta = ck.get("meta") or {}
    if "data" not in meta:
        raise ValueError(f"--checkpoint {args.checkpoint} records no data source (write it with onerec-fast train)")
    model = model_from_checkpoint(ck).to(device)
    del ck  # the weights are in the model now
    log, world = load_source(args.data or meta["data"], seed=meta["seed"], synthetic_overrides=meta.get("synthetic"))
    print(log.summary())
    codes, item_emb = model.item_codes.cpu(), meta["item_emb"]
    if codes.shape[0] != log.num_items:
        raise ValueError(f"--checkpoint has {codes.shape[0]} items, the data {log.num_items}: not the same data")
    batch_cfg = BatchConfig(**meta["batch_config"])
    truth, eval_fn = None, None
    if world is not None:
        truth = TableReward(torch.tensor(world.true_reward_matrix(np.arange(log.num_users)), dtype=torch.float32))
        test_ds = UserSequenceDataset(log, codes, "test", item_emb=item_emb, config=batch_cfg)
        idx = np.random.default_rng(args.seed).permutation(len(test_ds))[: args.eval_users]

        def eval_fn(m):
            return evaluate_policy(m, test_ds, truth, indices=idx, group_size=16, top_k=10, seed=1234, device=device)

    if args.rsft_steps:
        train_ds = UserSequenceDataset(log, codes, "train", item_emb=item_emb, config=batch_cfg)
        subset = rsft_subset(train_ds, field=args.rsft_field, quantile=args.rsft_quantile)
        print(f"RSFT: {len(subset)} of {len(train_ds)} training targets kept")
        Trainer(model, subset, TrainConfig(steps=args.rsft_steps, batch_size=args.batch_size, lr=args.rsft_lr,
                                           warmup_steps=max(1, args.rsft_steps // 10), seed=args.seed,
                                           parallel=args.parallel),
                device=device, out_dir=out / "rsft", meta=meta).train()

    if args.reward == "true":
        if truth is None:
            raise ValueError("--reward true needs the synthetic world (only it knows the true preference)")
        base = truth
    else:
        if args.pscore:
            pscore = PScoreModel.load(args.pscore, map_location=device)
        else:
            pscore = PScoreModel.from_log(log).to(device)
            losses = train_pscore(pscore, log, epochs=args.pscore_epochs, batch_size=2048, seed=args.seed)
            print(f"P-Score trained: loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
            broadcast_module(pscore)  # one reward for every rank, whatever each rank's training did
            if main:
                pscore.save(out / "pscore.pt")
        base = PScoreReward(pscore)
    adjustments = []
    if args.viral_alpha:
        adjustments.append(ExposureShareCap(log.num_items, alpha=args.viral_alpha, max_share=args.viral_share,
                                            device=device))
    if args.new_author_boost:
        if "author" not in log.item_features:
            raise ValueError("--new-author-boost needs an 'author' item feature in the data")
        adjustments.append(NewAuthorBoost(torch.as_tensor(log.item_features["author"]).to(device),
                                          new_author_mask(log, args.new_author_share).to(device),
                                          factor=args.new_author_boost))
    reward = ComposedReward(base, adjustments)

    rl_ds = UserSequenceDataset(log, codes, "train", item_emb=item_emb,
                                config=dataclasses.replace(batch_cfg, train_targets="last"))
    rl_cfg = RLConfig(
        steps=args.steps, user_fraction=args.user_fraction, users_per_round=args.users_per_round,
        group_size=args.group_size, generation=args.generation, temperature=args.temperature,
        constrained=args.constrained, format_k=args.format_k, format_weight=args.format_weight,
        ntp_weight=args.ntp_weight, eps=args.eps, delta=args.delta, lr=args.lr,
        updates_per_round=args.updates_per_round, mode=args.mode, sync_every=args.sync_every, seed=args.seed,
        eval_every=args.eval_every, ckpt_every=args.ckpt_every, parallel=args.parallel)
    trainer = ECPOTrainer(model, rl_ds, reward, rl_cfg, device=device, out_dir=out, eval_fn=eval_fn, meta=meta)
    if args.resume:
        trainer.resume(args.resume)
    metrics = trainer.train()
    evals = [m for m in metrics if "eval_reward" in m]
    if evals:
        print(f"true reward {evals[0]['eval_reward']:.4f} -> {evals[-1]['eval_reward']:.4f}; legality "
              f"{evals[0]['eval_legality']:.4f} -> {evals[-1]['eval_legality']:.4f}")
    print(f"checkpoint: {trainer.checkpoint_path}")
    return 0
