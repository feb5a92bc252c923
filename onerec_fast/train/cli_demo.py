"""``onerec-fast demo``: the whole OneRec pipeline in one command, sized for a 2-core CPU (< 10 minutes).

1. a synthetic short-video world (users with drifting interests, items with authors/tags/durations);
2. item embeddings (content + collaborative, fused) and RQ-KMeans semantic IDs;
3. pretraining with the recipe ``onerec-fast train`` picks for the data (progress bar: loss, tokens/s, MFU;
   validation and ``best.pt``);
4. trie-constrained beam-search generation and leave-one-out Recall/NDCG next to the most-popular and
   SASRec-style baselines (one table);
5. readable recommendations for two users, with their true expected watch ratio.

Everything goes to ``--out`` (default ``runs/demo``), as the last lines say: the checkpoints, the metrics, the loss
and validation plot (``loss.png``, with matplotlib) and ``results.json``.

On a GPU the same command runs the fused Triton/CUDA kernels (``backend="auto"``) with larger batches.
``--small`` shrinks everything for CI (well under 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onerec_fast.cli_args import positive_int
from onerec_fast.train.cli_common import add_device_arguments

# Sizes: (synthetic world overrides, pretraining steps, batch size, beam size, SASRec epochs)
_SIZES = {
    "small": (dict(num_users=120, num_items=300, median_history=30, max_history=120, heavy_user_frac=0.0),
              40, 16, 16, 2),
    "cpu": (dict(num_users=1000, num_items=2000, median_history=40, max_history=600, heavy_user_frac=0.0),
            400, 64, 32, 30),
    "gpu": (dict(num_users=4000, num_items=5000, median_history=60, max_history=3000, heavy_user_frac=0.002),
            1500, 256, 128, 100),
}


def demo_world_config(size: str) -> dict:
    """The synthetic world's overrides of a demo size (``small``, ``cpu`` or ``gpu``)."""
    return dict(_SIZES[size][0])


def add_arguments(parser) -> None:
    parser.add_argument("--small", action="store_true", help="tiny sizes for CI (well under 2 minutes on CPU)")
    parser.add_argument("--size", choices=tuple(_SIZES), default=None,
                        help="small, cpu or gpu (default: gpu on CUDA, else cpu; --small = small)")
    parser.add_argument("--steps", type=positive_int, default=None, help="override the pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--out", default="runs/demo", help="folder for the checkpoint and metrics")


def run(args) -> int:
    import torch

    from onerec_fast.data.sources import load_source
    from onerec_fast.model.config import OneRecConfig
    from onerec_fast.train.baselines import SASRecConfig
    from onerec_fast.train.checkpoint import load_checkpoint
    from onerec_fast.train.cli_common import resolve_device
    from onerec_fast.train.cli_generate import show_recommendations
    from onerec_fast.train.cli_train import apply_recipe, build_trainer, choose_transition_mixture
    from onerec_fast.train.evaluate import evaluate_all, format_table
    from onerec_fast.train.pipeline import prepare
    from onerec_fast.train.pretrain import plot_metrics

    t0 = time.perf_counter()
    device = resolve_device(args.device, args.threads)
    size = "small" if args.small else args.size or ("gpu" if device.type == "cuda" else "cpu")
    world_cfg, steps, batch, beam, sas_epochs = _SIZES[size]
    steps = args.steps or steps

    def banner(i: int, text: str) -> None:
        print(f"\n[{i}/5] {text}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    out = Path(args.out)
    print(f"onerec-fast demo: writing the run (checkpoints, metrics, plots, results) to {out}/")
    banner(1, f"synthetic world ({size} size)")
    loaded = load_source("synthetic", seed=args.seed, synthetic_overrides=world_cfg)
    print(loaded[0].summary())
    targs = argparse.Namespace(data="synthetic", recipe="auto", seed=args.seed, preset=None, code_levels=None,
                               pos_len=None, lifelong_len=None, dropout=None, attn_dropout=None,
                               transition_window=None, transition_prior=None, transition_mixture=None, time_budget=0.0,
                               steps=steps,
                               batch_size=batch, lr=None, warmup=None,
                               weight_decay=None, grad_clip=1.0, eval_every=None, patience=None, eval_users=None,
                               ckpt_every=0, log_every=max(1, steps // 50),
                               num_workers=0 if device.type == "cpu" else 4, backend="auto",
                               no_amp=False, device=str(device), out=args.out)
    recipe = apply_recipe(targs, len(loaded[0]))
    preset = OneRecConfig.preset(targs.preset)
    banner(2, "item embeddings (content + collaborative) and RQ-KMeans semantic IDs")
    prepared = prepare("synthetic", seed=args.seed, levels=targs.code_levels, short_len=preset.short_len,
                       positive_len=preset.pos_len, lifelong_len=preset.lifelong_len, synthetic=world_cfg,
                       splits=("train", "valid", "test"),
                       loaded=loaded, verbose=False)
    print(prepared.tokenizer_stats)
    banner(3, f"pretraining OneRec (recipe {recipe.name}) for {steps} steps of {batch} users on {device}")
    trainer = build_trainer(targs, prepared, recipe, synthetic=world_cfg)
    m = trainer.model
    print(f"model: {m.num_parameters() / 1e6:.2f}M dense parameters ({m.num_parameters(True) / 1e6:.2f}M with ID "
          f"tables); {len(prepared.datasets['train'])} training samples", flush=True)
    trainer.train()
    if trainer.best_path is not None and trainer.best_path.exists():
        m.load_state_dict(load_checkpoint(trainer.best_path)["model"])
        print(f"evaluating {trainer.best_path} (best validation NDCG@10, step {trainer.selection['best_step']})")
        chosen = choose_transition_mixture(trainer)
        if chosen:
            m.set_transition_mixture(chosen[0])
            print(chosen[1])
    banner(4, f"constrained generation (beam {beam}) and leave-one-out metrics vs baselines")
    results = evaluate_all(m, prepared.datasets["test"], prepared.log, beam_size=beam, batch_size=64, device=device,
                           sasrec_cfg=SASRecConfig(epochs=sas_epochs))
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    banner(5, "recommendations for two users")
    print(show_recommendations(m, prepared.log, prepared.world, prepared.datasets["test"], [0, 1], 5, beam, 3, device))
    plot = plot_metrics(out / "metrics.jsonl", out / "loss.png")
    print(f"\n{table}\n\nOneRec generated {results['OneRec']['users_per_s']:.0f} users/s; "
          f"demo finished in {time.perf_counter() - t0:.0f}s (torch {torch.__version__}, {device})")
    print(f"wrote {out}/: checkpoint.pt and best.pt (onerec-fast evaluate/generate --checkpoint {out}), "
          f"metrics.jsonl/.csv, results.json; {plot}")
    return 0
