"""Pure tensor functions, each with a PyTorch reference and optional GPU backends."""

from memkit.ops.attention import attention, naive_attention
from memkit.ops.backends import is_available
from memkit.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_state
from memkit.ops.rope import Rope3D, TabulatedRope3D, rope_3d
from memkit.ops.ssd import ssd_scan

__all__ = [
    "attention", "naive_attention", "gated_delta_rule", "gated_delta_rule_state", "ssd_scan", "Rope3D",
    "TabulatedRope3D", "rope_3d", "is_available",
]
