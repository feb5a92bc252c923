"""Does a trained OneRec's output depend on the user? The spread across users of its encoder states and of its
first-level code logits, next to their spread across codes, for the first test users of the data it was
trained on (a model that ignores its encoder predicts the same popularity list for everyone).

    python benchmarks/diagnostics/user_dependence.py --checkpoint runs/x/best.pt --data ../shared/data/ml-100k
    python benchmarks/diagnostics/user_dependence.py --checkpoint runs/demo/best.pt --data synthetic --demo-size cpu
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from onerec_fast.data import BatchConfig, collate_user_batch
    from onerec_fast.data.sources import load_source
    from onerec_fast.train.checkpoint import load_checkpoint
    from onerec_fast.train.cli_common import model_from_checkpoint
    from onerec_fast.train.cli_demo import demo_world_config
    from onerec_fast.train.pipeline import datasets_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--demo-size", default=None, choices=("small", "cpu", "gpu"),
                   help="with --data synthetic: the world of `onerec-fast demo` at that size")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (the synthetic world's)")
    p.add_argument("--users", type=int, default=64)
    a = p.parse_args(argv)
    model = model_from_checkpoint(load_checkpoint(a.checkpoint))
    cfg = model.cfg
    log, _ = load_source(a.data, seed=a.seed,
                         synthetic_overrides=demo_world_config(a.demo_size) if a.demo_size else None)
    bc = BatchConfig(short_len=cfg.short_len, positive_len=cfg.pos_len, lifelong_len=cfg.lifelong_len)
    # the model's own codes: no second tokenizer run, and right for any item vectors it was tokenized from
    test = datasets_for(log, model.item_codes.cpu(), None, bc, ("test",))["test"]
    model.eval()
    batch = collate_user_batch([test[i] for i in range(min(a.users, len(test)))])
    with torch.no_grad():
        states = model.encode(batch).states.float()
        logits = model.code_logits(batch)[0].float()
    print(f"{a.checkpoint}: {len(batch)} test users")
    print(f"encoder states        std across users {states.std(0).mean():.4f} per dim (state norm "
          f"{states.norm(dim=-1).mean():.2f})")
    print(f"level-0 code logits   std across users {logits.std(0).mean():.4f}, across codes {logits.std(1).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
