"""import_onnx on ONNX LSTM and RNN graphs built here with onnx.helper, onnxruntime as the oracle.

The graphs follow what PyTorch writes for nn.LSTM and nn.RNN (batch_first=True): Transpose -> one
node per layer with B = [b_ih, b_hh] (both non-zero) and zero initial states sized from the
input's Shape, or fed as graph inputs -> Squeeze -> Transpose; a bidirectional output joined by
Transpose + Reshape. ONNX features Keras's LSTM lacks (peepholes, input_forget, different g and h)
are imported when they change nothing and otherwise refused with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gru_engine import BundleError, InferenceSession, UnsupportedModelError
from gru_engine.exporters import import_onnx
from gru_engine.spec import max_excess
from test_onnx_import import (FEATURES, _assert_matches_onnxruntime, _assert_refused, _imported, _ints,
                              _pytorch_zero_h0, _save, _to_time_major, _value)

UNITS = 5
GATES = {"LSTM": 4, "RNN": 1}


def _weights(op: str, seed: int, directions: int, inputs: int, prefix: str = "", units: int = UNITS) -> list:
    """W (D, GH, I), R (D, GH, H), B (D, 2GH) initializers: an input and a recurrent bias, as PyTorch has."""
    rng = np.random.default_rng(seed)
    rows = GATES[op] * units
    shapes = {"W": (directions, rows, inputs), "R": (directions, rows, units), "B": (directions, 2 * rows)}
    return [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), prefix + name)
            for name, shape in shapes.items()]


def _zero_states(layers: int, carries: tuple[str, ...]):
    """PyTorch's torch.zeros(layers, batch, units) for h0 (and c0): one ConstantOfShape each."""
    nodes, initializers = _pytorch_zero_h0(layers, UNITS)
    for name in carries[1:]:
        nodes.append(helper.make_node("ConstantOfShape", ["h0_shape"], [name],
                                      value=numpy_helper.from_array(np.zeros(1, np.float32))))
    return nodes, initializers


def test_pytorch_two_layer_lstm_batch_first_then_linear(tmp_path):
    """nn.LSTM(3, 5, num_layers=2, batch_first=True) -> nn.Linear(5, 2), as torch.onnx writes it."""
    zero_nodes, zero_initializers = _zero_states(2, ("h0", "c0"))
    rng = np.random.default_rng(7)
    nodes = zero_nodes + [_to_time_major()]
    for layer in range(2):
        for carry in ("h0", "c0"):
            nodes.append(helper.make_node("Slice", [carry, f"start{layer}", f"end{layer}", "axis0"],
                                          [f"{carry}_{layer}"]))
        source = "x_t" if layer == 0 else "Y0_s"
        nodes += [helper.make_node("LSTM", [source, f"l{layer}.W", f"l{layer}.R", f"l{layer}.B", "", f"h0_{layer}",
                                            f"c0_{layer}"], [f"Y{layer}", f"Y{layer}_h", f"Y{layer}_c"],
                                   name=f"lstm_l{layer}", hidden_size=UNITS),
                  helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [f"Y{layer}_s"])]
    nodes += [helper.make_node("Transpose", ["Y1_s"], ["lstm_out"], perm=[1, 0, 2]),
              helper.make_node("MatMul", ["lstm_out", "fc.weight_t"], ["fc_mm"], name="fc/MatMul"),
              helper.make_node("Add", ["fc.bias", "fc_mm"], ["output"], name="fc/Add")]
    initializers = zero_initializers + _weights("LSTM", 2, 1, FEATURES, "l0.") + _weights("LSTM", 3, 1, UNITS, "l1.") \
        + [_ints("start0", [0]), _ints("end0", [1]), _ints("start1", [1]), _ints("end1", [2]), _ints("axis1", [1]),
           numpy_helper.from_array(rng.normal(0, 0.5, (UNITS, 2)).astype(np.float32), "fc.weight_t"),
           numpy_helper.from_array(rng.normal(0, 0.5, 2).astype(np.float32), "fc.bias")]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])],
                 [_value("output", ["batch", "time", 2])], initializers)
    model = _imported(path, tmp_path)
    assert [layer.kind for layer in model.spec.layers] == ["lstm", "lstm", "dense"]
    _assert_matches_onnxruntime(path, model)


def test_pytorch_bidirectional_lstm_with_state_inputs(tmp_path):
    """Y (T, 2, B, H) -> Transpose -> Reshape (T, B, 2H); h0 and c0 are graph inputs: the engine's
    initial_state is [h forward, c forward, h backward, c backward] (Keras's order)."""
    nodes = [_to_time_major(),
             helper.make_node("LSTM", ["x_t", "W", "R", "B", "", "h0", "c0"], ["Y"], name="bilstm",
                              hidden_size=UNITS, direction="bidirectional"),
             helper.make_node("Transpose", ["Y"], ["Y_tb"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Y_tb", "join"], ["Y_joined"]),
             helper.make_node("Transpose", ["Y_joined"], ["output"], perm=[1, 0, 2])]
    inputs = [_value("input", ["batch", "time", FEATURES]), _value("h0", [2, "batch", UNITS]),
              _value("c0", [2, "batch", UNITS])]
    path = _save(tmp_path, nodes, inputs, [_value("output", ["batch", "time", 2 * UNITS])],
                 _weights("LSTM", 1, 2, FEATURES) + [_ints("join", [0, 0, -1])])
    model = _imported(path, tmp_path)
    (layer,) = model.spec.layers
    assert layer.kind == "bidirectional" and layer.config["layer"] == "lstm"
    assert model.state_shapes == [UNITS] * 4

    def random_states(batch):
        h0, c0 = np.random.default_rng(batch).normal(0, 0.5, (2, 2, batch, UNITS)).astype(np.float32)
        return {"h0": h0, "c0": c0}, [h0[0], c0[0], h0[1], c0[1]]
    _assert_matches_onnxruntime(path, model, random_states)


def _lstm_with_states(attributes=None, extra_inputs=(), extra_initializers=(), outputs=("Y_h", "Y_c")):
    """input -> LSTM -> (output sequence, final h, final c); ``outputs``: which finals, in which order."""
    nodes = [_to_time_major(),
             helper.make_node("LSTM", ["x_t", "W", "R", "B", *extra_inputs], ["Y", "Y_h", "Y_c"], name="the_lstm",
                              hidden_size=UNITS, **(attributes or {})),
             helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"]),
             helper.make_node("Transpose", ["Y_s"], ["output"], perm=[1, 0, 2])]
    nodes += [helper.make_node("Squeeze", [final, "axis0"], [f"state_{k}"]) for k, final in enumerate(outputs)]
    graph_outputs = [_value("output", ["batch", "time", UNITS])] + [
        _value(f"state_{k}", ["batch", UNITS]) for k in range(len(outputs))]
    initializers = _weights("LSTM", 4, 1, FEATURES) + [_ints("axis0", [0]), _ints("axis1", [1]),
                                                       *extra_initializers]
    return nodes, [_value("input", ["batch", "time", FEATURES])], graph_outputs, initializers


def test_lstm_final_states_are_keras_return_state_and_zero_peepholes_are_exact(tmp_path):
    zero_peepholes = numpy_helper.from_array(np.zeros((1, 3 * UNITS), np.float32), "P")
    path = _save(tmp_path, *_lstm_with_states({"activations": ["HardSigmoid", "Tanh", "Tanh"],
                                               "activation_alpha": [1 / 6], "activation_beta": [0.5]},
                                              extra_inputs=("", "", "", "P"), extra_initializers=[zero_peepholes]))
    model = _imported(path, tmp_path)
    config = model.spec.layers[0].config
    assert config["return_state"] and config["recurrent_activation"] == "hard_sigmoid"
    _assert_matches_onnxruntime(path, model)


def test_pytorch_rnn_relu_with_final_state(tmp_path):
    """nn.RNN(3, 5, nonlinearity='relu', batch_first=True) returning (output, h_n)."""
    nodes = [_to_time_major(),
             helper.make_node("RNN", ["x_t", "W", "R", "B"], ["Y", "Y_h"], name="rnn", hidden_size=UNITS,
                              activations=["Relu"]),
             helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"]),
             helper.make_node("Transpose", ["Y_s"], ["output"], perm=[1, 0, 2]),
             helper.make_node("Squeeze", ["Y_h", "axis0"], ["state"])]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])],
                 [_value("output", ["batch", "time", UNITS]), _value("state", ["batch", UNITS])],
                 _weights("RNN", 5, 1, FEATURES) + [_ints("axis0", [0]), _ints("axis1", [1])])
    model = _imported(path, tmp_path)
    (layer,) = model.spec.layers
    assert layer.kind == "simple_rnn" and layer.config["activation"] == "relu" and layer.config["return_state"]
    _assert_matches_onnxruntime(path, model)


@pytest.mark.parametrize("op", ["LSTM", "RNN"])
def test_sequence_lens_and_states_in_graph_order_run_through_the_session(tmp_path, op):
    """sequence_lens on an LSTM (RNN) node as a graph input, the final states returned c before h: the
    session answers as onnxruntime, unequal lengths included."""
    nodes, inputs, outputs, initializers = _lstm_with_states(extra_inputs=("lens",),
                                                             outputs=("Y_c", "Y_h") if op == "LSTM" else ("Y_h",))
    nodes[1] = helper.make_node(op, ["x_t", "W", "R", "B", "lens"], ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2],
                                name="the_node", hidden_size=UNITS, direction="reverse")
    initializers[:3] = _weights(op, 4, 1, FEATURES)
    inputs.append(_value("lens", ["batch"], TensorProto.INT32))
    path = _save(tmp_path, nodes, inputs, outputs, initializers)
    session = InferenceSession(import_onnx(path, tmp_path / "lens.gru.safetensors"))
    oracle = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((4, 6, FEATURES)).astype(np.float32), "lens": np.int32([6, 3, 1, 5])}
    expected = oracle.run(None, feeds)
    actual = session.run(None, feeds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and max_excess(a, e) <= 0


def _c_as_data():
    nodes, inputs, _, initializers = _lstm_with_states(outputs=())
    nodes[2:] = [helper.make_node("Squeeze", ["Y_c", "axis0"], ["output"])]
    return nodes, inputs, [_value("output", ["batch", UNITS])], initializers


BAD_GRAPHS = {
    "peepholes": (lambda: _lstm_with_states(extra_inputs=("", "", "", "P"), extra_initializers=[
        numpy_helper.from_array(np.full((1, 3 * UNITS), 0.1, np.float32), "P")]), UnsupportedModelError,
        r"the_lstm.*peephole weights P are not zero"),
    "input-forget": (lambda: _lstm_with_states({"input_forget": 1}), UnsupportedModelError,
                     r"the_lstm.*input_forget=1 couples"),
    "different-g-and-h": (lambda: _lstm_with_states({"activations": ["Sigmoid", "Tanh", "Relu"]}),
                          UnsupportedModelError, r"g=tanh and h=relu differ"),
    "c-as-data": (_c_as_data, UnsupportedModelError, r"final cell state Y_c as data"),
    "peephole-shape": (lambda: _lstm_with_states(extra_inputs=("", "", "", "P"), extra_initializers=[
        numpy_helper.from_array(np.zeros((1, 2 * UNITS), np.float32), "P")]), BundleError,
        r"P is float32 \(1, 10\); expected float32 \(1, 15\)"),
}


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_lstm_graphs_keras_cannot_express_are_refused_with_the_reason(tmp_path, case):
    _assert_refused(tmp_path, *BAD_GRAPHS[case])
