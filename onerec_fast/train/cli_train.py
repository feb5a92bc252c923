"""``onerec-fast train``: pretrain a OneRec preset on a data source, with checkpoints and exact resume.

    onerec-fast train --data ../shared/data/ml-100k --preset tiny --steps 2000 --out runs/ml100k
    onerec-fast train ... --resume            # continue from the newest runs/ml100k/checkpoint.{pt,dcp}
    torchrun --nproc-per-node 8 -m onerec_fast.cli train --preset 0.935b --parallel fsdp ...   # multi-GPU
    torchrun --nproc-per-node 8 -m onerec_fast.cli train --preset 0.935b --expert-parallel ...  # DDP + experts split

Under torchrun every rank prepares the data (rank 0's item codes win, should the tokenizer differ), trains on
its slice of each ``--batch-size`` global batch and writes its shards of ``checkpoint.dcp``; rank 0 alone
prints and writes the metrics and the plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onerec_fast.cli_args import non_negative_int, number, positive_int
from onerec_fast.train.cli_common import add_data_arguments
from onerec_fast.train.recipe import RECIPES


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--recipe", default="auto", choices=("auto", *RECIPES),
                        help="defaults chosen from the data: auto (from the number of interactions), small or tr; "
                             "see onerec_fast/train/recipe.py. Flags given below override the recipe")
    parser.add_argument("--preset", default=None,
                        help="model: tiny, small, 0.015b, 0.121b, 0.935b, 2.6b (default: the recipe's)")
    parser.add_argument("--pos-len", type=positive_int, default=None, help="positive-feedback items per user (default: preset)")
    parser.add_argument("--lifelong-len", type=positive_int, default=None,
                        help="lifelong items per user before hierarchical compression (default: preset)")
    parser.add_argument("--dropout", type=number(float, min=0.0, max=0.9), default=None, help="dropout of the transformer (default: preset)")
    parser.add_argument("--attn-dropout", type=number(float, min=0.0, max=0.9), default=None,
                        help="dropout on the attention weights alone (default: --dropout's value)")
    parser.add_argument("--transition-window", type=non_negative_int, default=None,
                        help="learn a bias for each (recent item, trie node) pair seen in training, over the user's "
                             "N newest items (needs a preset with node heads, e.g. small; 0: off; default: the "
                             "recipe's where the preset has node heads, else 0)")
    parser.add_argument("--transition-prior", action=argparse.BooleanOptionalAction, default=None,
                        help="add to each seen pair's transition bias a learned function of its training counts "
                             "(a training row's own occurrences left out); default: the recipe's where "
                             "transition biases are on")
    parser.add_argument("--transition-mixture", action=argparse.BooleanOptionalAction, default=None,
                        help="generate from a mixture of the network and a Markov chain over the training "
                             "successors of the user's recent items, its weight chosen on the validation split "
                             "after training (stored in best.pt); default: the recipe's where transition biases "
                             "are on")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps in the whole run (default: the recipe's epochs over the training targets)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch, all ranks together (default: recipe)")
    parser.add_argument("--lr", type=number(float, min=0.0, min_open=True), default=None, help="peak learning rate (default: recipe)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="linear warmup steps (default: recipe)")
    parser.add_argument("--weight-decay", type=number(float, min=0.0), default=None, help="AdamW weight decay (default: recipe)")
    parser.add_argument("--grad-clip", type=number(float, min=0.0, min_open=True), default=1.0, help="clip the global gradient norm to this")
    parser.add_argument("--eval-every", type=non_negative_int, default=None,
                        help="steps between validation evaluations (Recall/NDCG@10 of constrained generation on the "
                             "validation targets; the best writes best.pt). 0: none (default: recipe, about an epoch)")
    parser.add_argument("--patience", type=non_negative_int, default=None,
                        help="stop after this many evaluations without a better validation NDCG@10 (0: never; "
                             "default: recipe)")
    parser.add_argument("--eval-users", type=non_negative_int, default=None,
                        help="validation users per evaluation, a fixed random sample (0: all; default: recipe)")
    parser.add_argument("--time-budget", type=number(float, min=0.0), default=None,
                        help="stop training after this many seconds of wall time (then evaluate and save as at the "
                             "end; the schedule anneals to fit); 0: no limit (default: recipe)")
    parser.add_argument("--ckpt-every", type=non_negative_int, default=200, help="checkpoint period in steps (0: only at the end)")
    parser.add_argument("--log-every", type=positive_int, default=10, help="steps per logged metrics row")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    parser.add_argument("--backend", default="auto", help="backend of the fused modules: auto, triton, cuda, reference")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each training step from CUDA graphs, batches padded to fixed shapes (default: "
                             "on with one GPU; 2-3x the steps/s of eager steps on Amazon Sports, "
                             "benchmarks/RESULTS.md session 16)")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                        help="under torchrun: DDP (replicated model) or FSDP2 (sharded parameters, gradients and "
                             "optimizer state); ignored in one process")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun with --parallel ddp: split each MoE layer's experts over the ranks "
                             "(num_experts must be a multiple of the number of processes)")
    parser.add_argument("--out", default="runs/train",
                        help="folder for checkpoint.pt, best.pt, metrics.jsonl/.csv, loss.png")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (or .dcp)")


_RECIPE_ARGS = ("preset", "code_levels", "batch_size", "lr", "warmup", "weight_decay", "patience", "eval_users",
                "time_budget")


def apply_recipe(args, num_interactions: int):
    """Fill every recipe-backed argument left at None from the recipe ``args.recipe`` chooses for a log of
    ``num_interactions``; returns the recipe. Explicit arguments win."""
    from onerec_fast.train.recipe import choose_recipe

    recipe = choose_recipe(getattr(args, "recipe", "auto"), num_interactions)
    for name in _RECIPE_ARGS:
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(recipe, name))
    return recipe


def build_trainer(args, prepared, recipe, synthetic: dict | None = None, show_progress: bool = True):
    """A Trainer for a prepared data source: the recipe's model over the preset, sized to the data's pathways
    and codes, with a validation ``eval_fn`` when the run evaluates. ``args`` went through :func:`apply_recipe`."""
    import numpy as np
    import torch

    from onerec_fast.model.config import OneRecConfig
    from onerec_fast.model.onerec import OneRec, features_from_dataset, with_transitions
    from onerec_fast.train.cli_common import resolve_device, run_meta
    from onerec_fast.train.evaluate import evaluate_onerec
    from onerec_fast.train.pretrain import Trainer, TrainConfig
    from onerec_fast.train.recipe import steps_for_epochs

    bc = prepared.batch_config
    ds = prepared.datasets["train"]
    dropout = {} if args.dropout is None else {"dropout": args.dropout}
    if args.attn_dropout is not None:
        dropout["attn_dropout"] = args.attn_dropout
    window = args.transition_window
    if window is None:  # the recipe's, where the preset (maybe chosen by hand) has the node heads it needs
        window = recipe.transition_window if OneRecConfig.preset(args.preset).node_heads else 0
    prior = args.transition_prior
    if prior is None:
        prior = recipe.transition_prior and window > 0
    mixture = args.transition_mixture
    if mixture is None:
        mixture = recipe.transition_mixture and window > 0
    cfg = OneRecConfig.preset(args.preset, **dropout, short_len=bc.short_len,
                              pos_len=bc.positive_len, lifelong_len=bc.lifelong_len, backend=args.backend,
                              transition_window=window, transition_prior=prior, transition_mixture=mixture,
                              **features_from_dataset(ds, prepared.item_codes, use_user_id=recipe.user_id))
    cfg, transitions = with_transitions(cfg, ds, prepared.item_codes)
    torch.manual_seed(args.seed)
    model = OneRec(cfg, prepared.item_codes, transitions=transitions)
    per_epoch = steps_for_epochs(1, len(ds), args.batch_size)
    steps = args.steps or steps_for_epochs(recipe.epochs, len(ds), args.batch_size)
    eval_every = args.eval_every
    if eval_every is None:
        eval_every = max(1, round(per_epoch / recipe.eval_per_epoch)) if recipe.eval_per_epoch else 0
    device = resolve_device(args.device)
    eval_fn = None
    valid = prepared.datasets.get("valid")
    if eval_every and valid is not None:
        n = len(valid) if not args.eval_users else min(args.eval_users, len(valid))
        idx = np.sort(np.random.default_rng(args.seed).permutation(len(valid))[:n])

        def eval_fn(m):
            return evaluate_onerec(m, valid, ks=(10,), beam_size=recipe.eval_beam, indices=idx, device=device,
                                   batch_size=256 if device.type == "cuda" else 64, show_progress=False)

    tc = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                     amp=not args.no_amp, cuda_graph=getattr(args, "cuda_graph", None),
                     log_every=args.log_every, ckpt_every=args.ckpt_every,
                     num_workers=args.num_workers, eval_every=eval_every if eval_fn else 0,
                     patience=args.patience if eval_fn else 0, time_budget_s=args.time_budget,
                     # the demo's namespace has no --parallel / --expert-parallel
                     parallel=getattr(args, "parallel", "ddp"), expert_parallel=getattr(args, "expert_parallel", False))
    return Trainer(model, ds, tc, device, out_dir=args.out, show_progress=show_progress,
                   meta=run_meta(args, prepared, synthetic), eval_fn=eval_fn)


# The chain weights tried on validation after training (cfg.transition_mixture). Test Recall/NDCG@10 of a
# trained model re-ranked offline peaked near 0.5 on Amazon Sports and ML-100K (docs/ARCHITECTURE.md).
MIXTURE_WEIGHTS = (0.0, 0.25, 0.5, 0.75)


def choose_transition_mixture(trainer) -> tuple[float, str] | None:
    """With ``cfg.transition_mixture`` and a ``best.pt`` picked on validation: ``best.pt``'s model (a plain copy
    loaded from the file, also where the trainer's model is sharded) evaluated by ``trainer.eval_fn`` (the same
    validation users) at each chain weight of :data:`MIXTURE_WEIGHTS` but the one it was selected at (the
    selection's own result stands for it); the best by ``cfg.select_metric`` (the smallest of equals) is
    written into ``best.pt``. Returns ``(weight, line to print)``, None where there is
    nothing to choose (no mixture, no validation, no best.pt, or not rank 0)."""
    import torch

    from onerec_fast.train.checkpoint import load_checkpoint, save_checkpoint
    from onerec_fast.train.cli_common import model_from_checkpoint

    path = trainer.best_path
    if (not trainer.model.cfg.transition_mixture or trainer.eval_fn is None or path is None or not path.exists()
            or not trainer.parallel.is_main):
        return None
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck)
    metric = trainer.cfg.select_metric
    found = {float(model.decoder.transition_mix): float(ck["selection"]["best"])}
    for w in MIXTURE_WEIGHTS:
        if w not in found:
            model.set_transition_mixture(w)
            found[w] = float(trainer.eval_fn(model)[metric])
    best = max(sorted(found), key=found.__getitem__)
    ck["model"]["decoder.transition_mix"] = torch.tensor(float(best))
    ck["selection"] = {**ck["selection"], "transition_mix": best,
                       "transition_mix_valid": {str(w): found[w] for w in sorted(found)}}
    save_checkpoint(path, ck)
    return best, (f"transition mixture: chain weight {best} in {path} (validation {metric} "
                  + ", ".join(f"{w}: {found[w]:.4f}" for w in sorted(found)) + ")")


def same_codes_as_rank0(prepared):
    """``prepared`` with rank 0's item codes and embeddings (its datasets rebuilt where this rank's tokenizer
    came out different): every rank must train on the same catalogue. Unchanged in one process."""
    import dataclasses

    import torch

    from onerec_fast.train.parallel import broadcast_object
    from onerec_fast.train.pipeline import datasets_for

    codes, emb = broadcast_object((prepared.item_codes, prepared.item_emb))
    if torch.equal(codes, prepared.item_codes) and torch.equal(emb, prepared.item_emb):
        return prepared
    datasets = datasets_for(prepared.log, codes, emb, prepared.batch_config, tuple(prepared.datasets))
    return dataclasses.replace(prepared, item_codes=codes, item_emb=emb, datasets=datasets)


def run(args) -> int:
    from onerec_fast.train.cli_common import resolve_device
    from onerec_fast.train.parallel import run_main

    return run_main(resolve_device(args.device), lambda: _run(args))


def _run(args) -> int:
    from onerec_fast.data.sources import load_source
    from onerec_fast.model.config import OneRecConfig
    from onerec_fast.train.checkpoint import find_checkpoint
    from onerec_fast.train.cli_common import resolve_device, synthetic_overrides
    from onerec_fast.train.parallel import expert_shards
    from onerec_fast.train.pipeline import prepare
    from onerec_fast.train.pretrain import plot_metrics

    synthetic = synthetic_overrides(args.synthetic)
    loaded = load_source(args.data, seed=args.seed, synthetic_overrides=synthetic)
    recipe = apply_recipe(args, len(loaded[0]))
    preset = OneRecConfig.preset(args.preset)
    print(f"recipe {recipe.name}: preset {args.preset}, dropout {preset.dropout if args.dropout is None else args.dropout}"
          f", lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay}, positive/lifelong lengths "
          f"{args.pos_len or preset.pos_len}/{args.lifelong_len or preset.lifelong_len}"
          f"{'' if recipe.user_id else ', no user-id embedding'}"
          f"{f', at most {args.time_budget:.0f} s of training' if args.time_budget else ''}"
          f"{', semantic IDs from the mean vectors of co-occurring items' if args.neighbour_mean else ''}")
    prepared = prepare(args.data, seed=args.seed, levels=args.code_levels, codebook_size=args.codebook_size,
                       neighbour_mean=args.neighbour_mean,
                       short_len=preset.short_len, positive_len=args.pos_len or preset.pos_len,
                       lifelong_len=args.lifelong_len or preset.lifelong_len, synthetic=synthetic,
                       splits=("train", "valid"), loaded=loaded)
    prepared = same_codes_as_rank0(prepared)
    resolve_device(args.device, args.threads)
    trainer = build_trainer(args, prepared, recipe, synthetic)
    if args.resume:
        ckpt = find_checkpoint(args.out, "checkpoint")
        trainer.resume(ckpt)
        print(f"resumed from {ckpt} at step {trainer.step}")
    m, p = trainer.model, trainer.parallel
    # the experts the other ranks hold, with --expert-parallel (this rank's model has 1/world_size of them)
    others = (p.world_size - 1) * sum(m.get_parameter(n).numel() for n in expert_shards(m))
    print(f"model {m.cfg.name}: {(m.num_parameters() + others) / 1e6:.2f}M dense parameters "
          f"({(m.num_parameters(include_sparse=True) + others) / 1e6:.2f}M with ID tables) on {trainer.device}"
          + (f" x {p.world_size} ranks ({p.mode}{', expert parallel' if p.expert_parallel else ''})"
             if p.mode != "single" else "")
          + f"; {trainer.cfg.steps} steps of {trainer.cfg.batch_size} over {len(trainer.dataset)} training targets"
          + (f", validation every {trainer.cfg.eval_every} steps (patience {trainer.cfg.patience})"
             if trainer.cfg.eval_every else ""))
    trainer.train()
    print(f"checkpoint: {trainer.checkpoint_path}")
    if trainer.cfg.eval_every and trainer.best_path is not None and trainer.best_path.exists():
        sel = trainer.selection
        print(f"best: {trainer.best_path} (step {sel['best_step']}, validation {trainer.cfg.select_metric} "
              f"{sel['best']:.4f})")
    chosen = choose_transition_mixture(trainer)
    if chosen:
        print(chosen[1])
    if p.is_main:
        print(plot_metrics(Path(args.out) / "metrics.jsonl", Path(args.out) / "loss.png"))
    return 0
