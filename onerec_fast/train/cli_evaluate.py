"""``onerec-fast evaluate``: leave-one-out Recall/NDCG@5/10 of a trained OneRec next to the most-popular
and SASRec-style baselines trained on the same split.

    onerec-fast evaluate --checkpoint runs/sports            # the run's best.pt (else its checkpoint.pt)
    onerec-fast evaluate --checkpoint runs/sports/checkpoint.pt --beam 128 --out runs/sports/eval.json

The SASRec-style baseline trains with the run's seed, with early stopping on the validation split; its result
is cached per data split (``$ONEREC_FAST_CACHE_DIR``, default ``~/.cache/onerec_fast``), so a second evaluate
of the same data does not retrain it.
"""

from __future__ import annotations

from onerec_fast.cli_args import number, positive_int
from onerec_fast.train.cli_common import add_device_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder written by onerec-fast train (its best.pt, else checkpoint.pt) or a "
                             "checkpoint file")
    parser.add_argument("--data", default=None, help="data source (default: the one recorded in the checkpoint)")
    parser.add_argument("--beam", type=number(int, min=10), default=128,
                        help="beam size of the constrained search (>= 10: the metrics rank 10 items)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="users per generation batch")
    parser.add_argument("--split", choices=("test", "valid"), default="test", help="which targets to rank")
    parser.add_argument("--no-baselines", action="store_true", help="OneRec only")
    parser.add_argument("--sasrec-epochs", type=positive_int, default=None,
                        help="at most this many epochs of the SASRec-style baseline (default: its config's, with "
                             "early stopping on the validation split)")
    parser.add_argument("--no-cache", action="store_true", help="retrain the baseline even when a cached result exists")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    add_device_arguments(parser)


def run(args) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from onerec_fast.train.baselines import SASRecConfig
    from onerec_fast.train.cli_common import load_run, resolve_device
    from onerec_fast.train.evaluate import evaluate_all, evaluate_onerec, format_table

    device = resolve_device(args.device, args.threads)
    model, log, _, ds, path, meta = load_run(args.checkpoint, args.data, splits=(args.split,), with_source=True)
    test = ds[args.split]
    mixture = (f"; generation mixes in the transition chain at weight {float(model.decoder.transition_mix):g}"
               if model.cfg.transition_mixture else "")
    print(f"{path}: {args.split} split, {len(test)} users; beam {args.beam}; {model.item_codes.shape[0]} items{mixture}")
    if args.no_baselines:
        results = {"OneRec": evaluate_onerec(model, test, beam_size=args.beam, batch_size=args.batch_size,
                                             device=device)}
    else:
        sas = SASRecConfig(seed=int(meta.get("seed", 0)))
        if args.sasrec_epochs:
            sas = dataclasses.replace(sas, epochs=args.sasrec_epochs)
        results = evaluate_all(model, test, log, beam_size=args.beam, batch_size=args.batch_size, device=device,
                               sasrec_cfg=sas, cache=not args.no_cache)
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": str(path), "split": args.split, "beam": args.beam,
                                   "data": args.data or meta.get("data"), "seed": meta.get("seed"),
                                   "results": results}, indent=1))
        print(f"results: {out}")
    return 0
