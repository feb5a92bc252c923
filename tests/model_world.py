"""A small hand-made world for the model and training tests: an InteractionLog with every kind of feature,
unique 3-level item codes, datasets and a tiny OneRec over them (no tokenizer or synthetic world needed),
and the fixtures both test modules import."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec_fast.data import BatchConfig, InteractionLog, UserSequenceDataset, collate_user_batch
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset

SHORT, POS, LIFELONG, QUERIES = 5, 8, 64, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module: tiny models gain nothing from intra-op threads, whose OpenMP overhead
    collapses on a busy CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    """(log, codes [I, 3], train dataset, test dataset)."""
    log = make_log()
    codes = make_codes(log.num_items)
    return log, codes, make_dataset(log, codes, "train"), make_dataset(log, codes, "test")


def make_log(num_users: int = 24, num_items: int = 48, per_user: int = 30, seed: int = 0) -> InteractionLog:
    """Users with ``per_user`` +- 10 interactions; labels (like), continuous engagement (playtime), item
    features (author, duration) and a user feature (gender)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(per_user - 10, per_user + 10, num_users)
    user = np.repeat(np.arange(num_users), lens)
    e = len(user)
    # Each user mostly watches one group of 4 items sharing their first two codes (see make_codes), so
    # the first two codes are predictable from the user and the history.
    pref = rng.integers(0, num_items // 4, num_users)[user]
    item = np.where(rng.random(e) < 0.85, pref * 4 + rng.integers(0, 4, e), rng.integers(0, num_items, e))
    return InteractionLog(
        user, item, np.arange(e) * 600, num_users, num_items,
        engagement={"like": rng.integers(0, 2, e), "playtime": (rng.random(e) * 100).astype(np.float32)},
        item_features={"author": rng.integers(0, 7, num_items), "duration": (rng.random(num_items) * 60).astype(np.float32)},
        user_features={"gender": rng.integers(0, 2, num_users)},
        positive_rule="like>0", name="test-world",
    )


def make_codes(num_items: int = 48) -> torch.Tensor:
    """Unique codes ``[I, 3]`` with vocabularies (4, 4, 4): a 4-ary tree over the item ids."""
    i = np.arange(num_items)
    return torch.tensor(np.stack([i // 16 % 4, i // 4 % 4, i % 4], 1), dtype=torch.int64)


def make_dataset(log, codes, split: str = "train") -> UserSequenceDataset:
    return UserSequenceDataset(log, codes, split, config=BatchConfig(short_len=SHORT, positive_len=POS,
                                                                     lifelong_len=LIFELONG))


def make_model(ds, codes, seed: int = 0, **overrides) -> OneRec:
    """A tiny OneRec for ``ds`` (decoder MoE 4 experts top-2 unless overridden), fp32, eval mode off."""
    fields = dict(short_len=SHORT, pos_len=POS, lifelong_len=LIFELONG, num_queries=QUERIES, backend="reference")
    cfg = OneRecConfig.preset("tiny", **{**fields, **features_from_dataset(ds, codes), **overrides})
    torch.manual_seed(seed)
    return OneRec(cfg, codes)


def batch_of(ds, indices) -> object:
    return collate_user_batch([ds[i] for i in indices])
