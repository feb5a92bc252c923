"""Scale-out on ``torch.distributed``: expert parallelism for :class:`~onerec_fast.modules.MoELayer`."""

from onerec_fast.distributed.expert_parallel import ExpertParallelMoE, shard_experts  # noqa: F401
