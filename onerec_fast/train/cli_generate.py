"""``onerec-fast generate``: top-K recommendations for given users, readable.

For each user the model reads the history before the user's last interaction (the leave-one-out test
input) and returns K catalogue items by constrained beam search, items already in that history left
out unless ``--no-exclude-history``; titles are shown where the data has them, and on the synthetic
world the true expected watch ratio of each recommendation. Users and items go by the dataset's own
ids (``log.user_raw_ids`` / ``item_raw_ids``; dense ids where the data has none).

    onerec-fast generate --checkpoint runs/ml100k/checkpoint.pt --users 196 186 22 --top-k 10
"""

from __future__ import annotations

import argparse

import torch

from onerec_fast.cli_args import UsageError, non_negative_int, positive_int
from onerec_fast.train.cli_common import add_device_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by onerec-fast train")
    parser.add_argument("--data", default=None, help="data source (None: the one recorded in the checkpoint)")
    parser.add_argument("--users", nargs="+", default=["0", "1", "2"],
                        help="user ids as the dataset numbers them (dense ids for data without its own)")
    parser.add_argument("--top-k", type=positive_int, default=10, help="recommendations per user")
    parser.add_argument("--beam", type=positive_int, default=128, help="beam size of the constrained search")
    parser.add_argument("--history", type=non_negative_int, default=5, help="recent history items to show per user")
    parser.add_argument("--exclude-history", action=argparse.BooleanOptionalAction, default=True,
                        help="leave out items the user already interacted with")
    add_device_arguments(parser)


def dense_users(log, users: list[str]) -> list[int]:
    """The dense ids of ``users`` given in the dataset's own numbering; UsageError naming unknown ones."""
    if log.user_raw_ids is not None:
        index = {str(r): i for i, r in enumerate(log.user_raw_ids.tolist())}
        unknown = [u for u in users if u not in index]
        if unknown:
            some = ", ".join(str(r) for r in log.user_raw_ids[:3].tolist())
            raise UsageError(f"--users: {', '.join(unknown)} not in the data ({log.num_users} users, ids like {some})")
        return [index[u] for u in users]
    bad = [u for u in users if not u.isdigit() or int(u) >= log.num_users]
    if bad:
        raise UsageError(f"--users: {', '.join(bad)} not in the data (users 0..{log.num_users - 1})")
    return [int(u) for u in users]


def user_name(log, u: int) -> str:
    return str(log.user_raw_ids[u]) if log.user_raw_ids is not None else str(u)


def item_name(log, i: int) -> str:
    raw = log.item_raw_ids[i] if log.item_raw_ids is not None else i
    return f"{log.item_titles[i]} (item {raw})" if log.item_titles else f"item {raw}"


def show_recommendations(model, log, world, test, users, top_k: int, beam: int, history: int, device,
                         exclude_history: bool = True) -> str:
    """Text block: per user (dense ids ``users``), recent history, the next real item, and the model's
    top-K (with true reward on the synthetic world), without items of the user's history when
    ``exclude_history``."""
    import numpy as np

    from onerec_fast.data import collate_user_batch

    row_of = {int(u): i for i, u in enumerate(test.sample_user)}
    missing = [user_name(log, u) for u in users if u not in row_of]
    if missing:
        raise UsageError(f"--users: {', '.join(missing)} have too short a history for a held-out item "
                         "(need >= 3 interactions)")
    batch = collate_user_batch([test[row_of[u]] for u in users])
    pasts = [log.item[int(test.offsets[u]):int(test.offsets[u]) + int(test.sample_pos[row_of[u]])] for u in users]
    # ask for enough extra items that top_k remain after the history is taken out (the beam bounds it)
    want = top_k + (max(len(set(p.tolist())) for p in pasts) if exclude_history else 0)
    model.eval().to(device)
    out = model.generate(batch.to(device), beam_size=max(beam, top_k), num_return=min(max(beam, top_k), want))
    lines = []
    for b, u in enumerate(users):
        past = pasts[b]
        recent = past[max(0, len(past) - history):] if history else past[:0]
        lines.append(f"user {user_name(log, u)}: {len(past)} past interactions; recent: "
                     + "; ".join(item_name(log, int(i)) for i in recent))
        lines.append(f"  next (held out): {item_name(log, int(batch.target_item[b]))}")
        ids, scores = out.item_ids[b].cpu(), out.scores[b].cpu()
        if exclude_history:
            keep = ~torch.isin(ids, torch.as_tensor(past))
            ids, scores = ids[keep], scores[keep]
        ids, scores = ids[:top_k], scores[:top_k]
        if len(ids) < top_k:
            lines.append(f"  (only {len(ids)} items outside the history within beam {beam})")
        reward = world.true_reward(np.full(len(ids), u), ids.clamp_min(0).numpy()) if world is not None else None
        for r, (i, sc) in enumerate(zip(ids.tolist(), scores.tolist())):
            extra = f"  true watch ratio {reward[r]:.2f}" if reward is not None else ""
            hit = "  <- held-out item" if i == int(batch.target_item[b]) else ""
            lines.append(f"  {r + 1:>2}. {item_name(log, i):<60} log p {sc:7.2f}{extra}{hit}")
    return "\n".join(lines)


def run(args) -> int:
    from onerec_fast.train.cli_common import load_run, resolve_device

    model, log, world, ds = load_run(args.checkpoint, args.data, splits=("test",))
    users = dense_users(log, args.users)
    print(show_recommendations(model, log, world, ds["test"], users, args.top_k, args.beam, args.history,
                               resolve_device(args.device, args.threads), args.exclude_history))
    return 0
