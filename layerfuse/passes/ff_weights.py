"""An FF sublayer's parameters as numpy arrays: read, permute, average, evaluate.

Everything is canonical float32: input-side matrices ``[model_dim, width]``, the output-side
matrix ``[width, model_dim]``, biases as vectors. Hidden neuron ``j`` is column ``j`` of every
input-side matrix, entry ``j`` of their biases and of any per-neuron constant inside the
activation, and row ``j`` of the output-side matrix; :meth:`FFWeights.permuted` moves all of
them together, which is why permuting one FF alone never changes what it computes.
"""

from __future__ import annotations

__all__ = [
    "FFWeights",
    "ff_forward",
    "hidden_activations",
    "mean_feedforward",
    "permute_matrix",
    "read_ff_weights",
    "require_modelled",
]

from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf

from layerfuse.errors import PlanError
from layerfuse.model.graph import constant_array
from layerfuse.passes.detect import FeedForward


@dataclass
class FFWeights:
    kind: str
    activation: str
    matrices: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    neuron_parameters: list[np.ndarray] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.matrices["down"].shape[0]

    def permuted(self, permutation: np.ndarray) -> FFWeights:
        """Hidden neuron ``j`` of the result is neuron ``permutation[j]`` of this FF."""
        matrices = {role: permute_matrix(role, m, permutation) for role, m in self.matrices.items()}
        biases = {
            role: (b if role == "down" else b[permutation]) for role, b in self.biases.items()
        }
        neurons = [p[..., permutation] for p in self.neuron_parameters]
        return FFWeights(self.kind, self.activation, matrices, biases, neurons)


def read_ff_weights(ff: FeedForward) -> FFWeights:
    matrices = {role: linear.read_weight() for role, linear in ff.linears.items()}
    return FFWeights(ff.kind, ff.activation, matrices, *_small_parameters(ff))


def permute_matrix(role: str, matrix: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """``matrix`` of projection ``role`` with hidden neuron ``j`` taken from ``permutation[j]``."""
    return matrix[permutation] if role == "down" else matrix[:, permutation]


def mean_feedforward(
    feedforwards: list[FeedForward], permutations: list[np.ndarray | None]
) -> FFWeights:
    """The elementwise mean of FFs of one shape (the merge step of the paper), each FF's
    neurons first put in order by its permutation (None: as they are).

    Read one projection of one FF at a time into a running sum, so memory holds the mean,
    one projection and its float32 copy, not the window's weights: a window of 8B-sized FFs
    is gigabytes.
    """
    count, first = len(feedforwards), feedforwards[0]
    matrices = {}
    for role in first.linears:
        total = None
        for ff, permutation in zip(feedforwards, permutations, strict=True):
            matrix = ff.linears[role].read_weight()
            if permutation is not None:
                matrix = permute_matrix(role, matrix, permutation)
            total = matrix if total is None else np.add(total, matrix, out=total)
        matrices[role] = np.divide(total, count, out=total)
    small = []
    for ff, permutation in zip(feedforwards, permutations, strict=True):
        own = FFWeights(ff.kind, ff.activation, {}, *_small_parameters(ff))
        small.append(own if permutation is None else own.permuted(permutation))
    return FFWeights(
        first.kind,
        first.activation,
        matrices,
        {role: np.mean([w.biases[role] for w in small], axis=0) for role in small[0].biases},
        [
            np.mean([w.neuron_parameters[i] for w in small], axis=0)
            for i in range(len(small[0].neuron_parameters))
        ],
    )


def _small_parameters(ff: FeedForward) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """An FF's biases and per-neuron constants: vectors, cheap to hold for a whole window."""
    biases = {
        role: bias
        for role, linear in ff.linears.items()
        if (bias := linear.read_bias()) is not None
    }
    return biases, [constant_array(v).astype(np.float32) for v in ff.neuron_parameters]


def _activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if name == "gelu_quick":
        return x / (1.0 + np.exp(-1.702 * x))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"no reference implementation for activation '{name}'")


def require_modelled(feedforwards: list[FeedForward], purpose: str) -> None:
    """Refuse FFs whose activation holds per-neuron constants (a fused BiasGelu's bias):
    :func:`hidden_activations` does not model them, so nothing computed from it may be used."""
    for ff in feedforwards:
        if ff.neuron_parameters:
            raise PlanError(
                f"{purpose} is not supported for FFs with constants inside the activation"
            )


def hidden_activations(weights: FFWeights, x: np.ndarray) -> np.ndarray:
    """The tensor the down-projection reads, for inputs ``x`` of shape ``[rows, model_dim]``
    (FFs checked with :func:`require_modelled`)."""
    up = x @ weights.matrices["up"] + weights.biases.get("up", 0.0)
    if "gate" not in weights.matrices:
        return _activation(weights.activation, up)
    gate = x @ weights.matrices["gate"] + weights.biases.get("gate", 0.0)
    return _activation(weights.activation, gate) * up


def ff_forward(weights: FFWeights, x: np.ndarray) -> np.ndarray:
    """What the FF computes, in numpy (float64 math on float32 weights)."""
    hidden = hidden_activations(weights, x.astype(np.float64))
    return hidden @ weights.matrices["down"] + weights.biases.get("down", 0.0)
