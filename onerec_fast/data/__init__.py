"""Data: the common :class:`InteractionLog`, loaders, the synthetic world, and jagged per-user batches."""

from onerec_fast.data.batch import (
    BatchConfig,
    JaggedItems,
    UserBatch,
    UserSequenceDataset,
    collate_user_batch,
    make_dataloader,
    parse_rule,
)
from onerec_fast.data.log import DataFormatError, InteractionLog
from onerec_fast.data.movielens import load_ml1m, load_ml100k, load_movielens
from onerec_fast.data.sequences import load_sequences
from onerec_fast.data.synthetic import SyntheticConfig, SyntheticWorld, make_synthetic_world
from onerec_fast.data.tables import load_interactions_table

__all__ = [
    "BatchConfig",
    "DataFormatError",
    "InteractionLog",
    "JaggedItems",
    "SyntheticConfig",
    "SyntheticWorld",
    "UserBatch",
    "UserSequenceDataset",
    "collate_user_batch",
    "load_interactions_table",
    "load_ml100k",
    "load_ml1m",
    "load_movielens",
    "load_sequences",
    "make_dataloader",
    "make_synthetic_world",
    "parse_rule",
]
