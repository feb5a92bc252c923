"""Post-training: ECPO policy optimization, format and industrial rewards, the P-Score reward model, RSFT."""

from onerec_fast.rl.ecpo import ecpo_loss, ecpo_loss_with_advantages, group_advantages
from onerec_fast.rl.loop import ECPOTrainer, Generations, RLConfig, evaluate_policy, sample_generations, sequence_logp
from onerec_fast.rl.reward_model import PScoreConfig, PScoreModel, PScoreReward, log_objectives, train_pscore
from onerec_fast.rl.rewards import (
    ComposedReward,
    ExposureShareCap,
    FormatReward,
    FormatRewardResult,
    NewAuthorBoost,
    TableReward,
    scale_reward,
)
from onerec_fast.rl.rsft import rsft_keep_mask, rsft_subset

__all__ = [
    "ComposedReward",
    "ECPOTrainer",
    "ExposureShareCap",
    "FormatReward",
    "FormatRewardResult",
    "Generations",
    "NewAuthorBoost",
    "PScoreConfig",
    "PScoreModel",
    "PScoreReward",
    "RLConfig",
    "TableReward",
    "ecpo_loss",
    "ecpo_loss_with_advantages",
    "evaluate_policy",
    "group_advantages",
    "log_objectives",
    "rsft_keep_mask",
    "rsft_subset",
    "sample_generations",
    "scale_reward",
    "sequence_logp",
    "train_pscore",
]
