"""Building blocks shared by the model families, numerically matched to transformers' implementations."""

from sglite.runtime.models.layers.linear import MergedLinear
from sglite.runtime.models.layers.mlp import GatedMLP
from sglite.runtime.models.layers.norm import RMSNorm
from sglite.runtime.models.layers.rotary import RotaryEmbedding, apply_rotary, rotate_qk

__all__ = ["GatedMLP", "MergedLinear", "RMSNorm", "RotaryEmbedding", "apply_rotary", "rotate_qk"]
