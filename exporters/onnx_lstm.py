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

from .onnx_recurrent import COMMON_ATTRIBUTES, Node, directions, read_activations, read_node, record_initial_states

LSTM_ATTRIBUTES = COMMON_ATTRIBUTES | {"input_forget"}
# ONNX's LSTM gate blocks i, o, f, c, in Keras's order i, f, c, o.
ONNX_GATES_TO_KERAS = (0, 2, 3, 1)


def _keras_gates(matrix: np.ndarray) -> np.ndarray:
    """Gate blocks (on the first axis, ONNX's layout) from i, o, f, c to Keras's i, f, c, o."""
    blocks = np.split(matrix, 4, axis=0)
    return np.concatenate([blocks[gate] for gate in ONNX_GATES_TO_KERAS], axis=0)


def _read(reader, operands, attributes, allowed: set[str], gates: int) -> Node:
    """What LSTM and RNN nodes add to the common checks: no clip, layout 0 only."""
    node = read_node(reader, operands, attributes, allowed, gates)
    if "clip" in attributes:
        reader.fail("the clip attribute (cell clipping) has no Keras equivalent")
    return node


def _weights(node: Node, kind: str) -> list[dict]:
    """Per direction, the Keras tensors: kernel = W[d].T, recurrent_kernel = R[d].T, bias = Wb + Rb
    (an LSTM's gate blocks in Keras's order)."""
    reorder = _keras_gates if kind == "lstm" else (lambda matrix: matrix)
    rows = node.w.shape[1]
    weights = []
    for d in range(node.count):
        tensors = {"kernel": np.ascontiguousarray(reorder(node.w[d]).T),
                   "recurrent_kernel": np.ascontiguousarray(reorder(node.r[d]).T)}
        if node.b is not None:
            tensors["bias"] = reorder(node.b[d, :rows] + node.b[d, rows:])
        weights.append(tensors)
    return weights


def _keras_activations(reader, attributes, count: int, per_direction: int) -> list[str]:
    """The node's activations as Keras names; LSTM and SimpleRNN compute only Keras's functions."""
    names = []
    for name, params in read_activations(reader, attributes, count, per_direction):
        if params or name not in RECURRENT_ACTIVATIONS:
            detail = f" with {params}" if params else ""
            reader.fail(f"activation {name}{detail}: an {reader.node.op_type} imports with Keras's activations only "
                        f"({', '.join(RECURRENT_ACTIVATIONS)}; HardSigmoid as alpha 1/6, beta 0.5)")
        names.append(name)
    return names


def read_lstm(reader, operands, attributes) -> list:
    """An ONNX LSTM node: Y, Y_h, Y_c."""
    operands = operands + [None] * (8 - len(operands))
    node = _read(reader, operands, attributes, LSTM_ATTRIBUTES, 4)
    initial_h, initial_c, peepholes = operands[5:8]
    if attributes.get("input_forget", 0) not in (0, 1):
        reader.malformed(f"input_forget is {attributes['input_forget']}; it must be 0 or 1")
    if attributes.get("input_forget", 0):
        reader.fail("input_forget=1 couples the forget gate to the input gate (f = 1 - i); Keras's LSTM, which "
                    "the engine computes, has independent gates, so no bundle can reproduce this node")
    if peepholes is not None:
        p = reader.constant(peepholes, "P")
        if p.shape != (node.count, 3 * node.units) or p.dtype != np.float32:
            reader.malformed(f"P is {p.dtype} {p.shape}; expected float32 {(node.count, 3 * node.units)}")
        if np.any(p):
            reader.fail("the peephole weights P are not zero; Keras's LSTM, which the engine computes, has no "
                        "peepholes, so no bundle can reproduce this node (with P all zero it imports exactly)")
    record_initial_states(reader, node, initial_h, initial_c)
    names = _keras_activations(reader, attributes, node.count, 3)
    configs = []
    for d in range(node.count):
        recurrent_activation, activation, output_activation = names[3 * d:3 * d + 3]
        if output_activation != activation:
            reader.fail(f"activations g={activation} and h={output_activation} differ; Keras's LSTM applies its "
                        "one activation to both the candidate and the cell state")
        configs.append({"activation": activation, "recurrent_activation": recurrent_activation,
                        "zero_output_for_mask": False})
    return directions(reader, node, "lstm", configs, _weights(node, "lstm"), 2)


def read_rnn(reader, operands, attributes) -> list:
    """An ONNX RNN node: Y, Y_h."""
    operands = operands + [None] * (6 - len(operands))
    node = _read(reader, operands, attributes, COMMON_ATTRIBUTES, 1)
    record_initial_states(reader, node, operands[5])
    configs = [{"activation": name, "zero_output_for_mask": False}
               for name in _keras_activations(reader, attributes, node.count, 1)]
    return directions(reader, node, "simple_rnn", configs, _weights(node, "simple_rnn"), 1)
