"""What the ONNX reader knows of each tensor while it walks a graph: a constant, a shape vector,
zeros, a graph input on its way to initial_h or sequence_lens, GRU (LSTM, RNN) outputs not yet
turned into a layer, or "the model input after these layers, with these axes"."""

from __future__ import annotations

import dataclasses

import numpy as np

from gru_engine import frontends
from gru_engine.spec import recurrent_configs

# Axis labels: the model's batch and time, a feature axis, the GRU's direction axis, a size-1 axis.
BATCH, TIME, FEATURE, DIRECTION, ONE = "batch", "time", "features", "direction", "1"
SUPPORTED = ("GRU, LSTM and RNN nodes with Transpose/Squeeze/Unsqueeze/Reshape/Gather/Slice/Concat glue, merges of "
             "the two directions (Concat/Add/Mul), MatMul/Gemm + Add + Relu/Sigmoid/Tanh/Softmax dense layers, "
             "Conv (+ Relu/Sigmoid/Tanh), MaxPool, AveragePool, GlobalMaxPool, GlobalAveragePool, "
             "BatchNormalization")
RECURRENT_OPS = ("GRU", "LSTM", "RNN")  # never folded, even with every input constant
# The second carry of an LSTM direction (c) is keyed as its direction's key + (CELL_CARRY,).
CELL_CARRY = 1
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
    origin: tuple = ()  # carry keys of the last layer, when it is recurrent (see ``carry_keys``)
    keys: tuple = ()    # per layer, its directions' carry keys (none for other layers)


@dataclasses.dataclass(eq=False)
class _Direction:
    name: str          # the GRU node's name, for the layer
    key: tuple         # (GRU node index, direction index)
    config: dict       # the GRU config; return_sequences is set when it becomes a layer
    weights: dict
    source: _Chain     # what the GRU reads
    flipped: bool      # its Y runs opposite to its processing order (a reverse ONNX direction)
    kind: str = "gru"  # the layer kind it becomes: gru, lstm or simple_rnn


@dataclasses.dataclass(eq=False)
class _Recurrent:
    """Y (sequence) or Y_h of a GRU node, before the directions become a layer."""

    directions: tuple
    axes: tuple        # DIRECTION stays while the directions are still stacked
    sequence: bool
    state: bool = False  # Y_h: the carry, also where a sample's steps end early (sequence_lens)
    carry: int = 0       # which final carry a state is: 0 h (Y_h), CELL_CARRY an LSTM's c (Y_c)


def carry_keys(direction: _Direction) -> tuple:
    """The keys of a direction's carries, in the engine's order: h, then c for an LSTM."""
    return (direction.key, direction.key + (CELL_CARRY,)) if direction.kind == "lstm" else (direction.key,)


def state_keys(value: _Recurrent) -> tuple:
    """The carry keys a final-state value holds, one per direction."""
    return tuple(d.key + ((CELL_CARRY,) if value.carry else ()) for d in value.directions)


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
    sequence = True
    for layer in chain.layers:
        if layer.kind in frontends.GLOBAL_POOLING_KINDS:
            sequence = False
        sequence = recurrent_configs(layer)[-1]["return_sequences"] if recurrent_configs(layer) else sequence
    return sequence


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

