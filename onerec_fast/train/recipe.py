"""Training recipes: every default of ``onerec-fast train`` that depends on the data, chosen from its size.

``onerec-fast train`` takes its model preset, pathway lengths, regularization, optimizer and schedule from a
recipe (``--recipe auto``, the default, picks one from the number of interactions); any flag given on the
command line overrides the recipe's value. The same command then serves every public dataset of a kind
without per-file flags.

* ``small`` (up to ``SMALL_MAX_INTERACTIONS``: MovieLens-100K/1M, the Amazon 5-core sets, Yelp, Steam): the
  ``small`` preset (narrow, shallow, dropout, pathways cut to what such histories use, trie-normalized code
  softmax, per-trie-node output vectors, transition biases over the 3 newest items with a prior on their
  counts; these sets have 10^5-10^6 interactions, where the TR's 0.015b preset without dropout overfits after
  about three epochs), generation mixed with the Markov chain of those counts, no user-id embedding, 8 epochs
  and at most 20 minutes of training, and model selection on the validation split with early stopping.
* ``tr``: the OneRec TR's setting (a named preset, its pathway lengths, no dropout) for large logs.

The measurements behind the choices are in ``docs/ARCHITECTURE.md`` (section "Recommendation quality").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES", "SMALL_MAX_INTERACTIONS", "choose_recipe", "steps_for_epochs"]

# Steam as SASRec and BERT4Rec preprocess it has 3.7M interactions, which the earlier bound of 3M sent to ``tr``:
# a recipe never validated below industrial scale (the TR's 0.015b setting, 30-40% below the SASRec-style
# baseline on a held-out Amazon set in issue 14's report), with no time limit. ``small`` is bounded by its time
# budget (20 minutes: at the ~90 steps/s of a graphed H100 step, ~27M training targets, 2.7 epochs of 10M), and its
# transition table (three keys per target and code level, before deduplication) stays near a gigabyte there.
SMALL_MAX_INTERACTIONS = 10_000_000


@dataclass(frozen=True)
class Recipe:
    """Defaults of one training recipe (the model's shape, dropout and pathway lengths are its ``preset``'s);
    ``epochs``: at most this many passes over the training targets (the schedule's length);
    ``eval_per_epoch``: validation evaluations per epoch (0: none); ``patience``: evaluations without a better
    validation NDCG@10 before stopping."""

    name: str
    preset: str
    code_levels: int = 3  # RQ-KMeans levels of the semantic IDs (the collision level comes on top)
    lr: float = 1e-3
    batch_size: int = 256
    epochs: float = 1.0
    warmup: int = 100
    weight_decay: float = 0.01
    eval_per_epoch: float = 0.0
    patience: int = 0
    eval_users: int = 0  # validation users per evaluation (0: all)
    eval_beam: int = 32
    time_budget: float = 0.0  # seconds of training at most, the schedule annealed to fit (0: no limit)
    user_id: bool = True  # the static pathway embeds the user id (memorizes users with few interactions)
    # transition biases over the user's N newest items (OneRecConfig.transition_window; used where the preset
    # has node heads). Sports, 3 seeds through the CLI: test Recall/NDCG@10 0.0396 / 0.0208 against 0.0375 /
    # 0.0195 without; ML-100K seed 0: 0.1474 / 0.0678 against 0.1241 / 0.0598 (benchmarks/RESULTS.md)
    transition_window: int = 0
    # with transition biases, a learned function of each pair's training counts on top of its bias
    # (OneRecConfig.transition_prior). Sports, 3 seeds through the CLI: test Recall/NDCG@10 0.0456 / 0.0249
    # against 0.0396 / 0.0208 with the biases alone; ML-100K, 3 seeds at equal steps: validation +6% to +13%,
    # test level on the mean; through the CLI 0.1294 / 0.0646 against the SASRec-style 0.1145 / 0.0517
    transition_prior: bool = False
    # with transition biases, generate from a mixture of the network and the Markov chain of the training
    # counts (OneRecConfig.transition_mixture), its weight chosen on validation after training. Sports, 3 seeds
    # through the CLI: test Recall/NDCG@10 0.0532 / 0.0305 against the SASRec-style 0.0472 / 0.0228
    transition_mixture: bool = False


RECIPES: dict[str, Recipe] = {
    # 8 epochs: Amazon Sports' validation NDCG@10 peaked at epoch 3-4 of a schedule annealed over 7 (session 13),
    # at epoch 5-7 of these 8 (session 14); 20 minutes: ML-100K on 2 CPU cores gets about 1.2 epochs in it, a
    # Sports run on an H100 shared by three needs about 6.5
    "small": Recipe(name="small", preset="small", lr=2e-3, batch_size=256, epochs=8, warmup=200, weight_decay=0.05,
                    eval_per_epoch=1.0, patience=5, eval_users=10_000, eval_beam=32, user_id=False, time_budget=1200,
                    transition_window=3, transition_prior=True, transition_mixture=True),
    "tr": Recipe(name="tr", preset="0.015b", lr=1e-3, batch_size=256, epochs=3, warmup=200, weight_decay=0.01,
                 eval_per_epoch=1.0, patience=3, eval_users=10_000, eval_beam=32),
}


def choose_recipe(name: str, num_interactions: int) -> Recipe:
    """The recipe ``name`` (``"auto"``: ``small`` up to :data:`SMALL_MAX_INTERACTIONS` interactions, else ``tr``)."""
    if name == "auto":
        name = "small" if num_interactions <= SMALL_MAX_INTERACTIONS else "tr"
    if name not in RECIPES:
        raise ValueError(f"recipe must be 'auto' or one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


def steps_for_epochs(epochs: float, num_samples: int, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``num_samples`` training targets (at least 1)."""
    return max(1, math.ceil(epochs * num_samples / batch_size))
