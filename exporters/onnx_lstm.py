"""ONNX ``LSTM`` and ``RNN`` nodes -> Keras LSTM and SimpleRNN directions, for ``onnx_reader``.

The reader calls ``read_lstm`` and ``read_rnn`` for these nodes; everything around them (glue,
merges, Dense layers, outputs) is the reader's, as for GRU nodes.

ONNX LSTM stores its gate blocks i, o, f, c with an input bias Wb and a recurrent bias Rb; Keras's
LSTM stores i, f, c, o with one bias, so kernel = W[d].T and recurrent_kernel = R[d].T with their
blocks reordered, bias = Wb + Rb (every bias term is added before its activation). The activations
are [f, g, h] per direction: Keras computes f = recurrent_activation and g = h = activation, so g
and h must be the same function. PyTorch's nn.LSTM keeps i, f, g, o in its own weights, but its
ONNX export writes a standard LSTM node (blocks i, o, f, c, B = [b_ih, b_hh]), which is read here
like any other; its zero initial_h and initial_c are sized from the input's Shape, as for nn.GRU.

ONNX RNN: H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb) is Keras's SimpleRNN with kernel = W[d].T,
recurrent_kernel = R[d].T, bias = Wb + Rb, activation = f.

sequence_lens, initial states (initial_c as initial_h) and the X layout (time-major, or the model
input read batch-major by swapping) are read as for GRU nodes; layout=1 is refused.

Refused, with the reason: peepholes P that are not all zero (Keras's LSTM has none, so no Keras
configuration computes them), input_forget=1 (it couples the forget gate to the input gate, which
Keras's LSTM does not), g and h that differ, clip, and activations or alpha/beta the engine's LSTM
and SimpleRNN do not compute (Keras's: Sigmoid, Tanh, Relu, HardSigmoid(1/6, 0.5), Affine(1, 0)).
"""

from __future__ import annotations

import numpy as np

from gru_engine.spec import RECURRENT_ACTIVATIONS

from .onnx_gru import SwappedInput
from .onnx_values import BATCH, DIRECTION, FEATURE, TIME, CELL_CARRY, _Direction, _Recurrent

LSTM_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
                   "input_forget", "layout"}
RNN_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size", "layout"}
# ONNX's LSTM gate blocks i, o, f, c, in Keras's order i, f, c, o.
ONNX_GATES_TO_KERAS = (0, 2, 3, 1)


def _keras_gates(matrix: np.ndarray) -> np.ndarray:
    """Gate blocks (on the first axis, ONNX's layout) from i, o, f, c to Keras's i, f, c, o."""
    blocks = np.split(matrix, 4, axis=0)
    return np.concatenate([blocks[gate] for gate in ONNX_GATES_TO_KERAS], axis=0)


def _common(reader, kind: str, operands, attributes, allowed: set[str], gates: int):
    """What LSTM and RNN nodes share with each other (and GRU): attribute and input checks, the
    weights as Keras matrices. Returns (x, direction, count, units, kernels, recurrent kernels, biases)."""
    op = reader.node.op_type
    unknown = sorted(set(attributes) - allowed)
    if unknown:
        reader.malformed(f"unknown attributes {unknown}")
    if "clip" in attributes:
        reader.fail("the clip attribute (cell clipping) has no Keras equivalent")
    if attributes.get("layout", 0) != 0:
        reader.fail("layout=1 (batch-major) is not run by onnxruntime; transpose to (time, batch, features)")
    x, w, r, b, sequence_lens = operands[:5]
    x = reader.chain(x)
    if x.axes != (TIME, BATCH, FEATURE):
        if not x.layers and x.axes == (BATCH, TIME, FEATURE) and not reader.input_settled:
            raise SwappedInput()
        reader.fail(f"input X has axes ({', '.join(x.axes)}); the model input is (batch, time, features) and an "
                    f"{op} with layout=0 reads (time, batch, features), so a Transpose [1, 0, 2] belongs before it")
    direction = attributes.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        reader.malformed(f"direction {direction!r} is not forward, reverse or bidirectional")
    count = 2 if direction == "bidirectional" else 1
    w, r = reader.constant(w, "W"), reader.constant(r, "R")
    b = None if b is None else reader.constant(b, "B")
    units = r.shape[-1] if r.ndim == 3 else -1
    expected = {"W": (w, (count, gates * units, x.width)), "R": (r, (count, gates * units, units)),
                "B": (b, (count, 2 * gates * units))}
    for name, (array, shape) in expected.items():
        if array is not None and (array.shape != shape or array.dtype != np.float32):
            reader.malformed(f"{name} is {array.dtype} {array.shape}; expected float32 {shape} "
                             f"({count} direction(s), hidden size {units}, input size {x.width})")
    reader.input_settled = True
    reader._read_lengths(sequence_lens, x)
    if attributes.get("hidden_size", units) != units:
        reader.malformed(f"hidden_size {attributes['hidden_size']} disagrees with R's hidden size {units}")
    reorder = _keras_gates if kind == "lstm" else (lambda matrix: matrix)
    kernels = [np.ascontiguousarray(reorder(w[d]).T) for d in range(count)]
    recurrent_kernels = [np.ascontiguousarray(reorder(r[d]).T) for d in range(count)]
    biases = None if b is None else [reorder(b[d, :gates * units] + b[d, gates * units:]) for d in range(count)]
    return x, direction, count, int(units), kernels, recurrent_kernels, biases


def _directions(reader, kind: str, x, direction: str, count: int, units: int, configs: list[dict], kernels,
                recurrent_kernels, biases, outputs: int) -> list:
    """The node's outputs as the reader's values: Y, Y_h (and Y_c for an LSTM)."""
    directions = []
    for d in range(count):
        reverse = direction == "reverse" or d == 1
        config = dict(configs[d], units=units, use_bias=biases is not None, return_sequences=False,
                      return_state=False, go_backwards=reverse != x.flipped, zero_output_for_mask=False,
                      stateful=False)
        weights = {"kernel": kernels[d], "recurrent_kernel": recurrent_kernels[d]}
        if biases is not None:
            weights["bias"] = biases[d]
        directions.append(_Direction(reader.layer_name(), (reader.node_index, d), config, weights, x, reverse, kind))
    directions = tuple(directions)
    return [_Recurrent(directions, (TIME, DIRECTION, BATCH, FEATURE), sequence=True)] + [
        _Recurrent(directions, (DIRECTION, BATCH, FEATURE), sequence=False, state=True, carry=carry)
        for carry in range(outputs)]


def _initial_states(reader, count: int, units: int, initial_h, initial_c=None) -> None:
    """Record where each direction's h (and c) start from, keyed as the reader keys carries."""
    for carry, initial in enumerate((initial_h, initial_c)[:1 + (initial_c is not None)]):
        for d, source in enumerate(reader._initial_sources(initial, count, units, 0)):
            reader.initial_states[(reader.node_index, d) + ((CELL_CARRY,) if carry else ())] = source


def _keras_activations(reader, attributes, count: int, per_direction: int) -> list[str]:
    """The node's activations as Keras names; LSTM and SimpleRNN compute only Keras's functions."""
    names = []
    for name, params in reader._activations(attributes, count, per_direction):
        if params or name not in RECURRENT_ACTIVATIONS:
            detail = f" with {params}" if params else ""
            reader.fail(f"activation {name}{detail}: an {reader.node.op_type} imports with Keras's activations only "
                        f"({', '.join(RECURRENT_ACTIVATIONS)}; HardSigmoid as alpha 1/6, beta 0.5)")
        names.append(name)
    return names


def read_lstm(reader, operands, attributes) -> list:
    """An ONNX LSTM node: Y, Y_h, Y_c."""
    operands = operands + [None] * (8 - len(operands))
    x, direction, count, units, kernels, recurrent_kernels, biases = _common(
        reader, "lstm", operands, attributes, LSTM_ATTRIBUTES, 4)
    initial_h, initial_c, peepholes = operands[5:8]
    if attributes.get("input_forget", 0) not in (0, 1):
        reader.malformed(f"input_forget is {attributes['input_forget']}; it must be 0 or 1")
    if attributes.get("input_forget", 0):
        reader.fail("input_forget=1 couples the forget gate to the input gate (f = 1 - i); Keras's LSTM, which "
                    "the engine computes, has independent gates, so no bundle can reproduce this node")
    if peepholes is not None:
        p = reader.constant(peepholes, "P")
        if p.shape != (count, 3 * units) or p.dtype != np.float32:
            reader.malformed(f"P is {p.dtype} {p.shape}; expected float32 {(count, 3 * units)}")
        if np.any(p):
            reader.fail("the peephole weights P are not zero; Keras's LSTM, which the engine computes, has no "
                        "peepholes, so no bundle can reproduce this node (with P all zero it imports exactly)")
    _initial_states(reader, count, units, initial_h, initial_c)
    names = _keras_activations(reader, attributes, count, 3)
    configs = []
    for d in range(count):
        recurrent_activation, activation, output_activation = names[3 * d:3 * d + 3]
        if output_activation != activation:
            reader.fail(f"activations g={activation} and h={output_activation} differ; Keras's LSTM applies its "
                        "one activation to both the candidate and the cell state")
        configs.append({"activation": activation, "recurrent_activation": recurrent_activation})
    return _directions(reader, "lstm", x, direction, count, units, configs, kernels, recurrent_kernels, biases, 2)


def read_rnn(reader, operands, attributes) -> list:
    """An ONNX RNN node: Y, Y_h."""
    operands = operands + [None] * (6 - len(operands))
    x, direction, count, units, kernels, recurrent_kernels, biases = _common(
        reader, "simple_rnn", operands, attributes, RNN_ATTRIBUTES, 1)
    _initial_states(reader, count, units, operands[5])
    names = _keras_activations(reader, attributes, count, 1)
    configs = [{"activation": name} for name in names]
    return _directions(reader, "simple_rnn", x, direction, count, units, configs, kernels, recurrent_kernels,
                       biases, 1)
