"""What the readers of ONNX's recurrent nodes share (GRU: ``onnx_gru``; LSTM and RNN: ``onnx_lstm``).

Every such node takes X, W, R, B, sequence_lens and initial_h first, the attributes
``COMMON_ATTRIBUTES``, and gives Y and its final carries. ``read_node`` checks that common part
(attributes, X in the node's layout, direction, weights of the shapes the hidden size implies,
sequence_lens); ``record_initial_states``, ``read_activations`` and ``directions`` do the rest that
does not depend on the family. Each function is given the reader (``onnx_reader``'s interpreter)
and reports through it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .onnx_values import BATCH, CELL_CARRY, DIRECTION, FEATURE, TIME, _Chain, _Const, _describe, _Direction, \
    _Lengths, _Recurrent, _StateInput, _Zeros

COMMON_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size", "layout"}
# ONNX activation (lower case) -> the spec's name.
ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "hardsigmoid": "hard_sigmoid",
               "affine": "affine", "leakyrelu": "leaky_relu", "thresholdedrelu": "thresholded_relu",
               "scaledtanh": "scaled_tanh", "elu": "elu", "softsign": "softsign", "softplus": "softplus"}
# The parameters each function consumes from activation_alpha / activation_beta (each list in order,
# separately), and the values onnxruntime uses when a list runs out: ONNX's defaults where the
# operators have them (LeakyRelu, HardSigmoid, Elu), else 0.
ONNX_PARAMETERS = {"hard_sigmoid": (0.2, 0.5), "affine": (0.0, 0.0), "leaky_relu": (0.01, None),
                   "thresholded_relu": (0.0, None), "scaled_tanh": (0.0, 0.0), "elu": (1.0, None)}
# Parameter values at which a function is one of Keras's, run on the plain path.
KERAS_EQUIVALENT = {("hard_sigmoid", np.float32(1 / 6), np.float32(0.5)): "hard_sigmoid",
                    ("affine", np.float32(1.0), np.float32(0.0)): "linear"}


class SwappedInput(Exception):
    """The model input reaches the first recurrent node with batch and time the other way round: it
    is time-major."""


@dataclasses.dataclass(frozen=True)
class Node:
    """The checked common part of a recurrent node."""

    x: _Chain              # the model data it reads
    layout: int            # 0: X (time, batch, features), 1: (batch, time, features)
    direction: str         # forward, reverse or bidirectional
    count: int             # directions
    units: int
    w: np.ndarray          # (count, gates * units, features)
    r: np.ndarray          # (count, gates * units, units)
    b: np.ndarray | None   # (count, 2 * gates * units): Wb, then Rb

    def reverse(self, d: int) -> bool:
        """Whether direction ``d`` reads the sequence from its end."""
        return self.direction == "reverse" or d == 1


def read_node(reader, operands, attributes, allowed: set[str], gates: int, layouts=(0,)) -> Node:
    """The node's common attributes and operands, checked; ``layouts`` are the layouts the family
    imports (onnxruntime runs only layout 0 for LSTM and RNN)."""
    op = reader.node.op_type
    unknown = sorted(set(attributes) - allowed)
    if unknown:
        reader.malformed(f"unknown attributes {unknown}")
    layout = attributes.get("layout", 0)
    if layout not in (0, 1):
        reader.malformed(f"layout is {layout}; it must be 0 (time, batch, features) or 1 (batch, time, features)")
    if layout not in layouts:
        reader.fail("layout=1 (batch-major) is not run by onnxruntime; transpose to (time, batch, features)")
    x, w, r, b, sequence_lens = operands[:5]
    x = reader.chain(x)
    expected = (TIME, BATCH, FEATURE) if layout == 0 else (BATCH, TIME, FEATURE)
    swapped = (expected[1], expected[0], FEATURE)
    if x.axes != expected:
        if not x.layers and x.axes == swapped and not reader.input_settled:
            raise SwappedInput()
        hint = ", so a Transpose [1, 0, 2] belongs before it" if x.axes == swapped else ""
        reader.fail(f"input X has axes ({', '.join(x.axes)}); the {op} node, with layout={layout}, reads "
                    f"({', '.join(expected)}){hint}")
    reader.input_settled = True
    direction = attributes.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        reader.malformed(f"direction {direction!r} is not forward, reverse or bidirectional")
    count = 2 if direction == "bidirectional" else 1
    w, r = reader.constant(w, "W"), reader.constant(r, "R")
    b = None if b is None else reader.constant(b, "B")
    units = r.shape[-1] if r.ndim == 3 else -1
    shapes = {"W": (w, (count, gates * units, x.width)), "R": (r, (count, gates * units, units)),
              "B": (b, (count, 2 * gates * units))}
    for name, (array, shape) in shapes.items():
        if array is not None and (array.shape != shape or array.dtype != np.float32):
            reader.malformed(f"{name} is {array.dtype} {array.shape}; expected float32 {shape} "
                             f"({count} direction(s), hidden size {units}, input size {x.width})")
        if array is not None and not np.isfinite(array).all():
            reader.malformed(f"{name} contains NaN or infinite values")
    if attributes.get("hidden_size", units) != units:
        reader.malformed(f"hidden_size {attributes['hidden_size']} disagrees with R's hidden size {units}")
    read_lengths(reader, sequence_lens, x)
    return Node(x, layout, direction, count, int(units), w, r, b)


def read_lengths(reader, sequence_lens, x: _Chain) -> None:
    """Every recurrent node must take the same sequence_lens: a graph input, a constant, or none."""
    if sequence_lens is None:
        source = None
    elif isinstance(sequence_lens, _Lengths):
        source = {"input": sequence_lens.name}
    elif isinstance(sequence_lens, _Const) and sequence_lens.array.ndim == 1 \
            and sequence_lens.array.dtype.kind in "iu":
        values = [int(v) for v in sequence_lens.array]
        if min(values, default=0) < 1:
            reader.malformed(f"sequence_lens holds {min(values, default=0)}; each length must be at least 1")
        source = {"values": values}
    else:
        reader.fail(f"sequence_lens is {_describe(sequence_lens)}; it must be a graph input or a constant "
                    "int32 (batch,) vector")
    if source is not None and x.flipped:
        reader.fail("with sequence_lens, a recurrent node cannot read a sequence reversed in time (the output "
                    "of a reverse direction taken alone): the padding would come first")
    if reader.recurrent_count and source != reader.lengths:
        reader.fail("every recurrent node (GRU, LSTM, RNN) of the graph must take the same sequence_lens (or none), "
                    "so that the padding of each sample is the same throughout")
    reader.recurrent_count += 1
    reader.lengths = source


def record_initial_states(reader, node: Node, initial_h, initial_c=None) -> None:
    """Record where each direction's h (and an LSTM's c) start from, keyed as the reader keys carries."""
    for carry, initial in enumerate((initial_h, initial_c)[:1 + (initial_c is not None)]):
        for d, source in enumerate(_initial_sources(reader, initial, node.count, node.units, node.layout)):
            reader.initial_states[(reader.node_index, d) + ((CELL_CARRY,) if carry else ())] = source


def _initial_sources(reader, initial_h, count: int, units: int, layout: int) -> list:
    """Per direction: None (zeros), {"input", "index"} or {"values"} (batch, units)."""
    if initial_h is None or isinstance(initial_h, _Zeros):
        return [None] * count
    if isinstance(initial_h, _Const):
        array = initial_h.array
        stacked = array if layout == 0 else array.swapaxes(0, 1) if array.ndim == 3 else array
        if array.dtype != np.float32 or stacked.ndim != 3 or stacked.shape[0] != count \
                or stacked.shape[2] != units or not np.isfinite(array).all():
            reader.malformed(f"initial_h is a constant {array.dtype} {array.shape}; expected finite float32 "
                             f"{(count, 'batch', units) if layout == 0 else ('batch', count, units)}")
        if not np.any(stacked):
            return [None] * count
        return [{"values": stacked[d].astype(np.float64).tolist()} for d in range(count)]
    if isinstance(initial_h, _StateInput):
        state = initial_h
        if layout == 1 and state.raw_dims is not None and len(state.raw_dims) == 3:
            # A graph input read by a batch-major GRU is (batch, directions, units).
            state = _StateInput((BATCH, DIRECTION, FEATURE),
                                tuple((state.sources[0][0], i) for i in range(state.raw_dims[1] or 0)))
            _state_axes(reader, state.sources[0][0], (BATCH, DIRECTION, FEATURE))
        elif state.raw_dims is not None:
            _state_axes(reader, state.sources[0][0], state.axes)
        expected = (DIRECTION, BATCH, FEATURE) if layout == 0 else (BATCH, DIRECTION, FEATURE)
        if state.axes == expected and len(state.sources) == count:
            return [{"input": name, "index": index} for name, index in state.sources]
    reader.fail(f"initial_h is {_describe(initial_h)}; expected a constant or a graph input of "
                f"{count} direction(s), batch and {units} units (layout={layout})")


def _state_axes(reader, name: str, axes: tuple) -> None:
    if reader.state_axes.setdefault(name, axes) != axes:
        reader.fail(f"input '{name}' is read as initial_h in two layouts")


def read_activations(reader, attributes, count: int, per_direction: int) -> list[tuple[str, dict]]:
    """ONNX activations (GRU [f, g], LSTM [f, g, h], RNN [f] per direction) -> (spec name, its
    parameters); activation_alpha and activation_beta are consumed in order, each only by the
    functions that take it."""
    defaults = {1: ["Tanh"], 2: ["Sigmoid", "Tanh"], 3: ["Sigmoid", "Tanh", "Tanh"]}[per_direction]
    names = attributes.get("activations", defaults * count)
    alphas = list(attributes.get("activation_alpha", []))
    betas = list(attributes.get("activation_beta", []))
    if len(names) != per_direction * count:
        reader.malformed(f"{len(names)} activations for {count} direction(s); an {reader.node.op_type} takes "
                         f"{per_direction} per direction")
    result = []
    for name in names:
        spec_name = ACTIVATIONS.get(str(name).lower())
        if spec_name is None:
            reader.fail(f"activation {name} is not one of ONNX's RNN activations; supported: "
                        "Relu, Tanh, Sigmoid, Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, "
                        "Softsign, Softplus")
        alpha, beta = ONNX_PARAMETERS.get(spec_name, (None, None))
        alpha = None if alpha is None else np.float32(alphas.pop(0) if alphas else alpha)
        beta = None if beta is None else np.float32(betas.pop(0) if betas else beta)
        if not all(v is None or np.isfinite(v) for v in (alpha, beta)):
            reader.malformed(f"activation {name} has a non-finite alpha or beta")
        keras_name = KERAS_EQUIVALENT.get((spec_name, alpha, beta))
        if keras_name is not None:
            result.append((keras_name, {}))
            continue
        params = {key: float(value) for key, value in (("alpha", alpha), ("beta", beta)) if value is not None}
        result.append((spec_name, params))
    return result


def directions(reader, node: Node, kind: str, configs: list[dict], weights: list[dict], carries: int) -> list:
    """The node's outputs as the reader's values: Y, then its ``carries`` final carries (Y_h, an
    LSTM's Y_c); ``configs`` and ``weights`` per direction, the family's part of the layer."""
    made = []
    for d in range(node.count):
        reverse = node.reverse(d)
        config = dict({"units": node.units, "use_bias": node.b is not None, "return_sequences": False,
                       "return_state": False, "go_backwards": reverse != node.x.flipped, "stateful": False},
                      **configs[d])
        made.append(_Direction(reader.layer_name(), (reader.node_index, d), config, weights[d], node.x, reverse, kind))
    made = tuple(made)
    y_axes = (TIME, DIRECTION, BATCH, FEATURE) if node.layout == 0 else (BATCH, TIME, DIRECTION, FEATURE)
    state_axes = (DIRECTION, BATCH, FEATURE) if node.layout == 0 else (BATCH, DIRECTION, FEATURE)
    return [_Recurrent(made, y_axes, sequence=True)] + [
        _Recurrent(made, state_axes, sequence=False, state=True, carry=carry) for carry in range(carries)]
