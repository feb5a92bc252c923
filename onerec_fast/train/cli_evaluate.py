"""``onerec-fast evaluate``: leave-one-out Recall/NDCG@5/10 of a trained OneRec next to the most-popular
and SASRec-style baselines trained on the same split.

    onerec-fast evaluate --checkpoint runs/ml100k/checkpoint.pt --beam 128
"""

from __future__ import annotations

from onerec_fast.train.cli_common import add_device_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by onerec-fast train")
    parser.add_argument("--data", default=None, help="data source (default: the one recorded in the checkpoint)")
    parser.add_argument("--beam", type=int, default=128, help="beam size of the constrained search")
    parser.add_argument("--batch-size", type=int, default=64, help="users per generation batch")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--no-baselines", action="store_true", help="OneRec only")
    parser.add_argument("--sasrec-epochs", type=int, default=50, help="epochs of the SASRec-style baseline")
    add_device_arguments(parser)


def run(args) -> int:
    from onerec_fast.train.baselines import SASRecConfig
    from onerec_fast.train.cli_common import load_run, resolve_device
    from onerec_fast.train.evaluate import evaluate_all, evaluate_onerec, format_table

    device = resolve_device(args.device, args.threads)
    model, log, _, ds = load_run(args.checkpoint, args.data, splits=(args.split,))
    test = ds[args.split]
    print(f"{args.split}: {len(test)} users; beam {args.beam}; {model.item_codes.shape[0]} items")
    if args.no_baselines:
        results = {"OneRec": evaluate_onerec(model, test, beam_size=args.beam, batch_size=args.batch_size,
                                             device=device)}
    else:
        results = evaluate_all(model, test, log, beam_size=args.beam, batch_size=args.batch_size, device=device,
                               sasrec_cfg=SASRecConfig(epochs=args.sasrec_epochs, seed=0))
    print(format_table(results))
    return 0
