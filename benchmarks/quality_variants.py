"""One model variant on one dataset, through the library (not the CLI), for ablations: one JSON line per
validation evaluation, then one with the test metrics of the best-validation weights.

    python benchmarks/quality_variants.py --data ../shared/data/amazon-sports/sequences.txt --name no-trie \\
        --preset small --no-uid --model '{"trie_loss": false}' --train '{"lr": 2e-3}' --time-budget 250
    python benchmarks/quality_variants.py --data ../shared/data/ml-100k --name sasrec --sasrec '{}'

``--model`` overrides OneRecConfig fields of ``--preset``, ``--train`` TrainConfig fields, ``--tok`` the
tokenizer arguments of ``onerec_fast.train.pipeline.prepare``; ``--sasrec`` trains the SASRec-style baseline
(SASRecConfig fields) instead. Validation runs on ``--eval-users`` users with beam 32 every epoch (patience 4);
the test ranks every user with ``--beam``. Several of these run at once on one GPU (benchmarks/RESULTS.md).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset, with_transitions
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.evaluate import evaluate_onerec, rank_metrics
from onerec_fast.train.pipeline import prepare
from onerec_fast.train.pretrain import TrainConfig, Trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--name", required=True, help="the variant's name (JSON lines, run folder under --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small")
    p.add_argument("--model", default="{}", help="JSON OneRecConfig overrides")
    p.add_argument("--train", default="{}", help="JSON TrainConfig overrides")
    p.add_argument("--tok", default="{}", help="JSON tokenizer arguments of prepare()")
    p.add_argument("--item-vectors", default=None, help=".npy float [I, D]: tokenize these item vectors instead")
    p.add_argument("--no-uid", action="store_true", help="no user-id embedding in the static pathway")
    p.add_argument("--normalize", default=None, help="beam search normalization (default: the model's)")
    p.add_argument("--pos-len", type=int, default=50)
    p.add_argument("--lifelong-len", type=int, default=200)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training (0: none)")
    p.add_argument("--eval-users", type=int, default=8000)
    p.add_argument("--beam", type=int, default=64)
    p.add_argument("--extra-beams", type=int, nargs="*", default=[],
                   help="also report the test Recall/NDCG@10 at these beam sizes (keys beamN/recall@10, ...)")
    p.add_argument("--sasrec", default=None, help="JSON SASRecConfig fields: train the baseline instead")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/variants")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    if a.sasrec is not None:
        from onerec_fast.data.sources import load_source
        from onerec_fast.train.baselines import SASRecConfig, sasrec_topk, train_sasrec

        log, _ = load_source(a.data)
        m = train_sasrec(log, SASRecConfig(seed=a.seed, **json.loads(a.sasrec)), device=dev, show_progress=False)
        top, target = sasrec_topk(m, log, 10, device=dev)
        print(json.dumps({"name": a.name, "sasrec": True, "valid": m.selection,
                          "test": rank_metrics(top, target, (5, 10)), "s": time.time() - t0}), flush=True)
        return 0
    prep = prepare(a.data, seed=a.seed, short_len=20, positive_len=a.pos_len, lifelong_len=a.lifelong_len,
                   splits=("train", "valid", "test"), verbose=False, **json.loads(a.tok),
                   item_vectors=None if a.item_vectors is None else torch.from_numpy(np.load(a.item_vectors)))
    ds, valid = prep.datasets["train"], prep.datasets["valid"]
    cfg = OneRecConfig.preset(a.preset, short_len=20, pos_len=a.pos_len, lifelong_len=a.lifelong_len,
                              **features_from_dataset(ds, prep.item_codes, use_user_id=not a.no_uid),
                              **json.loads(a.model))
    cfg, transitions = with_transitions(cfg, ds, prep.item_codes)
    torch.manual_seed(a.seed)
    model = OneRec(cfg, prep.item_codes, transitions=transitions)
    tr = dict(batch_size=256, lr=1e-3, warmup_steps=200, weight_decay=0.05, patience=4, log_every=50)
    tr.update(json.loads(a.train))
    per_epoch = len(ds) // tr["batch_size"]
    tr.setdefault("eval_every", per_epoch)
    idx = np.sort(np.random.default_rng(0).permutation(len(valid))[:a.eval_users])
    out = os.path.join(a.out, a.name)

    def eval_fn(m):
        r = evaluate_onerec(m, valid, ks=(10,), beam_size=32, indices=idx, device=dev, batch_size=256,
                            show_progress=False, normalize=a.normalize)
        print(json.dumps({"name": a.name, "eval": r, "t": round(time.time() - t0)}), flush=True)
        return r

    trainer = Trainer(model, ds, TrainConfig(steps=int(a.epochs * per_epoch), seed=a.seed, ckpt_every=0,
                                             time_budget_s=a.time_budget, **tr),
                      dev, out_dir=out, show_progress=False, eval_fn=eval_fn)
    t1 = time.time()
    trainer.train()
    train_s = time.time() - t1
    model.load_state_dict(load_checkpoint(os.path.join(out, "best.pt"))["model"])
    res = evaluate_onerec(model, prep.datasets["test"], ks=(5, 10), beam_size=a.beam, device=dev, batch_size=256,
                          show_progress=False, normalize=a.normalize)
    for beam in a.extra_beams:
        r = evaluate_onerec(model, prep.datasets["test"], ks=(10,), beam_size=beam, device=dev, batch_size=256,
                            show_progress=False, normalize=a.normalize)
        res.update({f"beam{beam}/{k}": v for k, v in r.items() if k.endswith("@10")})
    print(json.dumps({"name": a.name, "final": True, "test": res, "best_step": trainer.selection["best_step"],
                      "best_valid": trainer.selection["best"], "steps": trainer.step, "per_epoch": per_epoch,
                      "train_s": round(train_s), "steps_per_s": trainer.step / train_s,
                      "tok": prep.tokenizer_stats.splitlines()[-1], "params": model.num_parameters(),
                      "s": round(time.time() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
