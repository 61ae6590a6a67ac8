"""Detection: map a graph's transformer blocks, FF sublayers, attention, norms and residuals."""

from layerfuse.passes.detect.attention import Attention
from layerfuse.passes.detect.feedforward import FeedForward
from layerfuse.passes.detect.norms import Norm, Residual
from layerfuse.passes.detect.result import Match, Rejection
from layerfuse.passes.detect.structure import (
    SCHEMA,
    Block,
    ModelStructure,
    detect_structure,
    sublayer_counts,
)
from layerfuse.passes.detect.wiring import Wiring

__all__ = [
    "SCHEMA",
    "Attention",
    "Block",
    "FeedForward",
    "Match",
    "ModelStructure",
    "Norm",
    "Rejection",
    "Residual",
    "Wiring",
    "detect_structure",
    "sublayer_counts",
]
