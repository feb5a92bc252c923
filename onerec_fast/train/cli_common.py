"""Pieces shared by the ``train``, ``evaluate``, ``generate`` and ``demo`` subcommands: arguments, the
device, and rebuilding a model and its datasets from a checkpoint."""

from __future__ import annotations

import dataclasses

import torch

from onerec_fast.cli_args import device as device_arg
from onerec_fast.cli_args import positive_int

__all__ = ["add_data_arguments", "add_device_arguments", "resolve_device", "load_run", "model_from_checkpoint", "run_meta", "synthetic_overrides"]


def add_data_arguments(parser) -> None:
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic', a MovieLens folder (e.g. ../shared/data/ml-100k; ML-1M, ML-20M too), a "
                             ".csv/.parquet interactions table (user, item and timestamp columns, found by their "
                             "common names: user_id, userId, asin, unixReviewTime, ...) or a .txt sequence file "
                             "(default: synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, tokenizer, init and data order")
    parser.add_argument("--codebook-size", type=positive_int, default=None,
                        help="codes per RQ-KMeans level (default: from the catalogue size, <= 8192)")
    parser.add_argument("--code-levels", type=positive_int, default=None,
                        help="RQ-KMeans levels of the semantic IDs, before the collision level (default: the recipe's)")
    parser.add_argument("--neighbour-mean", action="store_true",
                        help="tokenize each item by the mean of the items it co-occurs with rather than its own fused "
                             "vector (onerec_fast.tokenizer.mean_over_neighbours; off by default: level on Amazon "
                             "Sports, mixed on ML-100K)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="FIELD=VALUE",
                        help="synthetic world setting, repeatable (e.g. --synthetic num_users=200); see SyntheticConfig")
    add_device_arguments(parser)


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU intra-op threads (default 1: the small models' ops gain little from more, and "
                             "OpenMP spin-waits collapse throughput on a busy machine)")


def synthetic_overrides(pairs: list[str]) -> dict:
    """``["num_users=200", "drift=0.1"]`` -> ``{"num_users": 200, "drift": 0.1}`` (ints, floats or strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--synthetic expects FIELD=VALUE, got {pair!r}")
        for cast in (int, float, str):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
    return out


def resolve_device(name: str | None, threads: int | None = None) -> torch.device:
    """The device to run on; on CPU also sets torch's intra-op thread count to ``threads``."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    return device


def run_meta(args, prepared, synthetic: dict | None = None) -> dict:
    """What a checkpoint needs to rebuild its datasets: the source, seed, pathway lengths and item embeddings."""
    return {"data": args.data, "seed": args.seed, "synthetic": dict(synthetic or {}),
            "batch_config": dataclasses.asdict(prepared.batch_config), "item_emb": prepared.item_emb}


def model_from_checkpoint(ck: dict):
    """A ``OneRec`` with the checkpoint's config and weights (catalogue codes included). A checkpoint with
    non-finite weights (a diverged run) is refused with ValueError naming them: it would rank nothing."""
    from onerec_fast.model.config import OneRecConfig
    from onerec_fast.model.onerec import OneRec

    bad = [k for k, v in ck["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"the checkpoint's weights are not finite ({len(bad)} tensors, e.g. {bad[:3]}): the run "
                         "diverged; evaluate an earlier checkpoint or retrain with a lower --lr")
    fields = dict(ck["model_config"])
    for k in ("item_num_features", "codebook_size"):
        if isinstance(fields.get(k), list):
            fields[k] = tuple(fields[k])
    model = OneRec(OneRecConfig(**fields))
    model.load_state_dict(ck["model"])
    return model


def load_run(path: str, data: str | None = None, splits=("test",), with_source: bool = False):
    """(model, log, world, datasets) from a ``train`` checkpoint (a run folder: its ``best``, else its
    ``checkpoint``); ``data`` overrides the recorded source. ``with_source`` adds the checkpoint file read and
    its ``meta`` (data source, seed, ...) to the tuple."""
    from onerec_fast.data import BatchConfig
    from onerec_fast.train.checkpoint import load_checkpoint, resolve_checkpoint
    from onerec_fast.data.sources import load_source
    from onerec_fast.train.pipeline import datasets_for

    path = resolve_checkpoint(path)
    ck = load_checkpoint(path)
    meta = ck.get("meta") or {}
    if "data" not in meta:
        raise ValueError(f"checkpoint {path} has no data source recorded (written by Trainer without meta)")
    model = model_from_checkpoint(ck)
    log, world = load_source(data or meta["data"], seed=meta["seed"], synthetic_overrides=meta.get("synthetic"))
    if log.num_items != model.item_codes.shape[0]:
        raise ValueError(f"the data has {log.num_items} items but the checkpoint's catalogue has "
                         f"{model.item_codes.shape[0]}: not the data it was trained on")
    bc = BatchConfig(**meta["batch_config"])
    run = (model, log, world, datasets_for(log, model.item_codes, meta["item_emb"], bc, splits))
    return (*run, path, meta) if with_source else run
