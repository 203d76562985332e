"""What the ONNX reader knows of each tensor while it walks a graph: a constant, a shape vector,
zeros, a graph input on its way to initial_h or sequence_lens, GRU outputs not yet turned into a
layer, or "the model input after these layers, with these axes"."""

from __future__ import annotations

import dataclasses

import numpy as np

from gru_engine.spec import gru_configs

# Axis labels: the model's batch and time, a feature axis, the GRU's direction axis, a size-1 axis.
BATCH, TIME, FEATURE, DIRECTION, ONE = "batch", "time", "features", "direction", "1"
SUPPORTED = ("GRU nodes with Transpose/Squeeze/Unsqueeze/Reshape/Gather/Slice/Concat glue, merges of the two "
             "directions (Concat/Add/Mul), MatMul/Gemm + Add + Relu/Sigmoid/Tanh/Softmax dense layers")
# A Slice bound at or beyond these reaches the end of the axis (PyTorch and numpy both use them).
SLICE_END = 2**31 - 1
SLICE_BEFORE_START = -(2**31)
MAX_FOLDED_ELEMENTS = 50_000_000



@dataclasses.dataclass(eq=False)
class _Const:
    array: np.ndarray


@dataclasses.dataclass(eq=False)
class _Shape:
    """An int64 vector of sizes: ints, or BATCH / TIME for the model's dynamic sizes."""

    dims: tuple
    scalar: bool = False


@dataclasses.dataclass(eq=False)
class _Zeros:
    """An all-zero float tensor (its shape is left to onnxruntime)."""


@dataclasses.dataclass(eq=False)
class _StateInput:
    """Graph inputs on their way to initial_h: per direction along DIRECTION, (input name, index
    along that input's direction axis, None for a (batch, units) input)."""

    axes: tuple
    sources: tuple
    raw_dims: tuple | None = None  # the graph input's dims, while it is untouched

    @property
    def directions(self) -> int:
        return len(self.sources)


@dataclasses.dataclass(eq=False)
class _States:
    """Final states (Y_h) of GRU directions of several nodes, stacked along DIRECTION (PyTorch's h_n)."""

    keys: tuple
    axes: tuple


@dataclasses.dataclass(eq=False)
class _Lengths:
    """The graph input holding sequence_lens."""

    name: str


@dataclasses.dataclass(eq=False)
class _Chain:
    """The model input after ``layers``; ``flipped``: reversed in time relative to their output."""

    layers: tuple
    axes: tuple
    width: int         # size of the FEATURE axis
    flipped: bool = False
    open: str = ""     # the last layer still absorbs: "kernel" (a bias), "bias" (an activation), "sum" (-> ave)
    origin: tuple = ()  # GRU directions of the last layer, when it is recurrent
    keys: tuple = ()    # per layer, its GRU directions' keys (none for other layers)


@dataclasses.dataclass(eq=False)
class _Direction:
    name: str          # the GRU node's name, for the layer
    key: tuple         # (GRU node index, direction index)
    config: dict       # the GRU config; return_sequences is set when it becomes a layer
    weights: dict
    source: _Chain     # what the GRU reads
    flipped: bool      # its Y runs opposite to its processing order (a reverse ONNX direction)


@dataclasses.dataclass(eq=False)
class _Recurrent:
    """Y (sequence) or Y_h of a GRU node, before the directions become a layer."""

    directions: tuple
    axes: tuple        # DIRECTION stays while the directions are still stacked
    sequence: bool
    state: bool = False  # Y_h: the carry, also where a sample's steps end early (sequence_lens)


def _describe(value) -> str:
    if isinstance(value, _Const):
        return f"a constant of shape {value.array.shape}"
    if isinstance(value, _Lengths):
        return "sequence lengths"
    if isinstance(value, _States):
        return "stacked final states"
    if isinstance(value, (_Chain, _Recurrent, _StateInput)):
        return f"a tensor with axes ({', '.join(value.axes)})"
    return {_Shape: "a shape vector", _Zeros: "a zero tensor"}.get(type(value), "an unknown value")


def _text(value):
    """ONNX string attributes arrive as bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(item) for item in value]
    return value


def _is_sequence(chain: _Chain) -> bool:
    recurrent = [config for layer in chain.layers for config in gru_configs(layer)]
    return not recurrent or recurrent[-1]["return_sequences"]


def _match_reshape(axes: list, sizes: list, target: list):
    """Labels for ``target`` if it only inserts/removes size-1 axes around ``axes`` (None otherwise)."""
    core = [(axis, size) for axis, size in zip(axes, sizes) if axis != ONE]
    free = target.count(-1)
    if free > 1:
        return None

    def match(t: int, c: int) -> list | None:
        if t == len(target):
            return [] if c == len(core) else None
        entry = target[t]
        if c < len(core) and (entry == core[c][1] or entry == -1):
            rest = match(t + 1, c + 1)
            if rest is not None:
                return [core[c][0]] + rest
        if entry == 1:
            rest = match(t + 1, c)
            if rest is not None:
                return [ONE] + rest
        return None
    return match(0, 0)

