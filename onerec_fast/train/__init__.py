"""Pretraining (exact resume, atomic checkpoints), evaluation against baselines, and the CLI subcommands."""

from onerec_fast.train.baselines import SASRec, SASRecConfig, popularity_topk, train_sasrec
from onerec_fast.train.checkpoint import load_checkpoint, save_checkpoint
from onerec_fast.train.evaluate import evaluate_all, evaluate_onerec, format_table, rank_metrics
from onerec_fast.train.pretrain import EpochBatchSampler, Trainer, TrainConfig, lr_at
from onerec_fast.train.progress import ProgressBar

__all__ = [
    "EpochBatchSampler",
    "ProgressBar",
    "SASRec",
    "SASRecConfig",
    "TrainConfig",
    "Trainer",
    "evaluate_all",
    "evaluate_onerec",
    "format_table",
    "load_checkpoint",
    "lr_at",
    "popularity_topk",
    "rank_metrics",
    "save_checkpoint",
    "train_sasrec",
]
