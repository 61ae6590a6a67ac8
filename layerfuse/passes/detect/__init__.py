"""Detection: map a graph's transformer blocks, FF sublayers, attention, norms and residuals."""

from layerfuse.passes.detect.attention import Attention
from layerfuse.passes.detect.feedforward import FeedForward
from layerfuse.passes.detect.norms import Norm, Residual
from layerfuse.passes.detect.structure import (
    SCHEMA,
    Block,
    ModelStructure,
    Wiring,
    detect_structure,
    sublayer_counts,
)

__all__ = [
    "SCHEMA",
    "Attention",
    "Block",
    "FeedForward",
    "ModelStructure",
    "Norm",
    "Residual",
    "Wiring",
    "detect_structure",
    "sublayer_counts",
]
