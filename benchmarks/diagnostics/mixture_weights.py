"""Test (or validation) Recall/NDCG@5/10 of one trained OneRec at each weight of the transition mixture's
Markov chain (``OneRecConfig.transition_mixture``; weight 0 is the network alone): how much the chain adds to
this model, measured on the split that chose nothing.

    python benchmarks/diagnostics/mixture_weights.py --checkpoint runs/x/best.pt --data ../shared/data/ml-100k
    python benchmarks/diagnostics/mixture_weights.py --checkpoint R/best.pt --data D --weights 0 0.5 --users 6000

A checkpoint trained without the mixture but with the count prior (its transition counts) gets the mixture
turned on here, so the same weights are compared on a model that never saw it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(argv=None) -> int:
    from onerec_fast.data import BatchConfig
    from onerec_fast.data.sources import load_source
    from onerec_fast.train.checkpoint import load_checkpoint
    from onerec_fast.train.cli_common import model_from_checkpoint
    from onerec_fast.train.evaluate import evaluate_onerec
    from onerec_fast.train.pipeline import datasets_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--beam", type=int, default=128)
    p.add_argument("--users", type=int, default=0, help="a random subset of this many users (0: all)")
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ck = load_checkpoint(a.checkpoint)
    cfg = ck["model_config"]
    if not cfg.get("transition_mixture"):
        if not cfg.get("transition_prior"):
            raise SystemExit(f"{a.checkpoint}: no transition counts (trained without the count prior and the mixture)")
        cfg["transition_mixture"] = True
        ck["model"]["decoder.transition_mix"] = torch.tensor(0.0)
    model = model_from_checkpoint(ck).eval()
    log, _ = load_source(a.data)
    bc = BatchConfig(short_len=model.cfg.short_len, positive_len=model.cfg.pos_len, lifelong_len=model.cfg.lifelong_len)
    ds = datasets_for(log, model.item_codes.cpu(), None, bc, (a.split,))[a.split]
    idx = None if not a.users or a.users >= len(ds) else np.sort(np.random.default_rng(0).choice(len(ds), a.users, replace=False))
    stored = float(model.decoder.transition_mix)
    print(f"{a.checkpoint}: stored chain weight {stored}; {a.split}, {len(ds) if idx is None else len(idx)} users, "
          f"beam {a.beam}, {dev}", flush=True)
    for w in a.weights:
        model.set_transition_mixture(w)
        res = evaluate_onerec(model, ds, beam_size=a.beam, batch_size=256, device=dev, indices=idx, show_progress=False)
        print(json.dumps({"weight": w, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
