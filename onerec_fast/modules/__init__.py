"""nn.Modules built on the fused ops."""

from onerec_fast.modules.moe import MoEAuxLoss, MoELayer, MoEStats  # noqa: F401
from onerec_fast.modules.qformer import QFormer, QFormerCrossAttention  # noqa: F401
from onerec_fast.modules.rms_norm import RMSNorm  # noqa: F401
