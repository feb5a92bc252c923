"""``onerec-fast generate``: top-K recommendations for given users, readable.

For each user the model reads the history before the user's last interaction (the leave-one-out test
input) and returns K catalogue items by constrained beam search; titles are shown where the data has
them, and on the synthetic world the true expected watch ratio of each recommendation.

    onerec-fast generate --checkpoint runs/ml100k/checkpoint.pt --users 0 1 2 --top-k 10
"""

from __future__ import annotations

from onerec_fast.train.cli_common import add_device_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by onerec-fast train")
    parser.add_argument("--data", default=None, help="data source (default: the one recorded in the checkpoint)")
    parser.add_argument("--users", type=int, nargs="+", default=[0, 1, 2], help="dense user ids")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--beam", type=int, default=128)
    parser.add_argument("--history", type=int, default=5, help="recent history items to show per user")
    add_device_arguments(parser)


def item_name(log, i: int) -> str:
    raw = log.item_raw_ids[i] if log.item_raw_ids is not None else i
    return f"{log.item_titles[i]} (item {raw})" if log.item_titles else f"item {raw}"


def show_recommendations(model, log, world, test, users, top_k: int, beam: int, history: int, device) -> str:
    """Text block: per user, recent history, the next real item, and the model's top-K (with true reward
    on the synthetic world)."""
    import numpy as np

    from onerec_fast.data import collate_user_batch

    row_of = {int(u): i for i, u in enumerate(test.sample_user)}
    missing = [u for u in users if u not in row_of]
    if missing:
        raise ValueError(f"users {missing} have no test sample (need >= 3 interactions; {log.num_users} users)")
    batch = collate_user_batch([test[row_of[u]] for u in users])
    model.eval().to(device)
    out = model.generate(batch.to(device), beam_size=beam, num_return=top_k)
    lines = []
    for b, u in enumerate(users):
        s, n = int(test.offsets[u]), int(test.sample_pos[row_of[u]])
        recent = log.item[s + max(0, n - history):s + n]
        lines.append(f"user {u}: {n} past interactions; recent: " + "; ".join(item_name(log, int(i)) for i in recent))
        lines.append(f"  next (held out): {item_name(log, int(batch.target_item[b]))}")
        ids = out.item_ids[b].cpu()
        reward = world.true_reward(np.full(len(ids), u), ids.clamp_min(0).numpy()) if world is not None else None
        for r, (i, sc) in enumerate(zip(ids.tolist(), out.scores[b].cpu().tolist())):
            extra = f"  true watch ratio {reward[r]:.2f}" if reward is not None else ""
            hit = "  <- held-out item" if i == int(batch.target_item[b]) else ""
            lines.append(f"  {r + 1:>2}. {item_name(log, i):<60} log p {sc:7.2f}{extra}{hit}")
    return "\n".join(lines)


def run(args) -> int:
    from onerec_fast.train.cli_common import load_run, resolve_device

    model, log, world, ds = load_run(args.checkpoint, args.data, splits=("test",))
    print(show_recommendations(model, log, world, ds["test"], args.users, args.top_k, args.beam, args.history,
                               resolve_device(args.device, args.threads)))
    return 0
