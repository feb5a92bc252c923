"""RSFT (reject-sampling fine-tuning): keep only the better-engaged sessions and fine-tune on them.

OneRec fine-tunes the pretrained model on sessions filtered by engagement, dropping the bottom 50% by
play duration. Here a *session* is a training sample's target interaction by default (one user, one
target item), or, when the log has a session-id column, every interaction of one (user, session) pair
with the field summed over it. The field (any engagement column) and the dropped quantile are
configurable.

Exactly ``floor(quantile * n)`` of the ``n`` sessions are dropped: the lowest by value, ties broken by
the earlier position (a stable sort), so the kept fraction does not depend on how many sessions tie at
the threshold (play durations are often rounded).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rsft_keep_mask", "rsft_subset", "DEFAULT_RSFT_FIELDS"]

# Tried in order when no field is given: the first engagement column the log has.
DEFAULT_RSFT_FIELDS = ("playtime", "play_duration", "watch_time", "watch_ratio", "rating")


def rsft_keep_mask(values, quantile: float = 0.5, groups=None) -> np.ndarray:
    """Which entries survive dropping the bottom ``quantile`` of sessions by ``values``.

    Args:
        values: ``[n]`` numbers, one per entry (e.g. the play duration of each target interaction).
        quantile: fraction of sessions to drop, in ``[0, 1)``.
        groups: optional ``[n]`` session id per entry: a session's value is the sum over its entries,
            and its entries are kept or dropped together.

    Returns:
        bool ``[n]``: True for entries of kept sessions.
    """
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D [n], got shape {v.shape}")
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must lie in [0, 1), got {quantile}")
    if np.isnan(v).any():
        raise ValueError("values must not contain NaN")
    if groups is None:
        inverse, session_value = np.arange(len(v)), v
    else:
        g = np.asarray(groups)
        if g.shape != v.shape:
            raise ValueError(f"groups must have the shape of values {v.shape}, got {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        session_value = np.bincount(inverse, weights=v)
    order = np.argsort(session_value, kind="stable")
    keep_session = np.ones(len(session_value), dtype=bool)
    keep_session[order[: int(np.floor(quantile * len(session_value)))]] = False
    return keep_session[inverse]


def rsft_subset(dataset, field: str | None = None, quantile: float = 0.5,
                session_field: str | None = None) -> torch.utils.data.Subset:
    """The samples of a :class:`~onerec_fast.data.batch.UserSequenceDataset` that survive RSFT filtering.

    Args:
        dataset: the training split; its samples' target interactions are the sessions (or belong to them).
        field: engagement column ranked (default: the first of :data:`DEFAULT_RSFT_FIELDS` in the log).
        quantile: fraction of sessions dropped (default 0.5: the bottom half).
        session_field: optional engagement column holding a session id; sessions are then (user, session)
            pairs over the whole log, valued by the sum of ``field`` over their interactions.

    Returns:
        a ``torch.utils.data.Subset`` of ``dataset`` (feed it to ``make_dataloader``/the pretraining loop).
    """
    log = dataset.log
    if field is None:
        field = next((f for f in DEFAULT_RSFT_FIELDS if f in log.engagement), None)
        if field is None:
            raise ValueError(f"field: the log has none of the default RSFT fields {DEFAULT_RSFT_FIELDS}; "
                             f"pass one of its engagement columns {sorted(log.engagement)}")
    if field not in log.engagement:
        raise ValueError(f"field: no engagement column {field!r} in the log (have {sorted(log.engagement)})")
    rows = dataset.offsets[dataset.sample_user] + dataset.sample_pos  # the target row of each sample
    if session_field is None:
        keep = rsft_keep_mask(log.engagement[field][rows], quantile)
    else:
        if session_field not in log.engagement:
            raise ValueError(f"session_field: no engagement column {session_field!r} in the log "
                             f"(have {sorted(log.engagement)})")
        # sessions are per user: (user, session id) pairs, valued over every interaction of the log
        key = log.user.astype(np.int64) * (int(log.engagement[session_field].max()) + 1) + log.engagement[session_field]
        keep_rows = rsft_keep_mask(log.engagement[field], quantile, groups=key)
        keep = keep_rows[rows]
    return torch.utils.data.Subset(dataset, np.flatnonzero(keep).tolist())
