"""import_onnx on ONNX GRU graphs built here with onnx.helper, onnxruntime as the oracle.

The graphs follow what other frameworks write: PyTorch's nn.GRU(batch_first=True) export
(Transpose -> GRU with linear_before_reset=1 and a zero initial_h sized from the input's Shape ->
Squeeze -> Transpose, a bidirectional output joined by Transpose + Reshape, nn.Linear as MatMul +
Add or Gemm), Keras-style go_backwards layers, merges of two directions, and graphs that must be
refused with an error naming the node (or a BundleError for a malformed file), never a crash.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import gru_engine
from gru_engine import BundleError, UnsupportedModelError
from gru_engine.exporters import import_onnx
from gru_engine.spec import max_excess

FEATURES, UNITS = 3, 4
SHAPES = ((4, 9), (1, 1))  # (batch, time) unlike the (2, 7) self-check


def _value(name, shape, element=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, element, shape)


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _gru_weights(seed: int, directions: int, units: int, inputs: int, prefix: str = "") -> list:
    """W (D, 3H, I), R (D, 3H, H), B (D, 6H) initializers, gates z, r, h."""
    rng = np.random.default_rng(seed)
    shapes = {"W": (directions, 3 * units, inputs), "R": (directions, 3 * units, units), "B": (directions, 6 * units)}
    return [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), prefix + name)
            for name, shape in shapes.items()]


def _save(tmp_path, nodes, inputs, outputs, initializers, name="graph.onnx", check=True):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    if check:  # the well-formed graphs must be valid ONNX, so onnxruntime's answer means something
        onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _imported(path, tmp_path):
    return gru_engine.load(import_onnx(path, tmp_path / "imported.gru.safetensors"))


def _assert_matches_onnxruntime(path, model, extra_feeds=lambda batch: ({}, None)):
    """The engine against onnxruntime on inputs of several (batch, time)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, time in SHAPES:
        x = np.random.default_rng(batch * time).standard_normal((batch, time, FEATURES)).astype(np.float32)
        feeds, initial_state = extra_feeds(batch)
        expected = session.run(None, {"input": x, **feeds})
        actual = model.predict(x, initial_state=initial_state)
        actual = actual if isinstance(actual, list) else [actual]
        assert [a.shape for a in actual] == [e.shape for e in expected]
        for a, e in zip(actual, expected):
            assert max_excess(a, e) <= 0, f"x{x.shape}: differs by {np.abs(a - e).max():.3g}"


def _to_time_major():
    return helper.make_node("Transpose", ["input"], ["x_t"], name="to_time_major", perm=[1, 0, 2])


def test_bidirectional_gru_with_initial_h_input(tmp_path):
    """PyTorch's bidirectional layout: Y (T, 2, B, H) -> Transpose -> Reshape (T, B, 2H); h0 is a graph input."""
    nodes = [_to_time_major(),
             helper.make_node("GRU", ["x_t", "W", "R", "B", "", "h0"], ["Y", "Y_h"], name="bigru",
                              hidden_size=UNITS, direction="bidirectional", linear_before_reset=1),
             helper.make_node("Transpose", ["Y"], ["Y_tb"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Y_tb", "join"], ["Y_joined"]),
             helper.make_node("Transpose", ["Y_joined"], ["output"], perm=[1, 0, 2])]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES]), _value("h0", [2, "batch", UNITS])],
                 [_value("output", ["batch", "time", 2 * UNITS])],
                 _gru_weights(1, 2, UNITS, FEATURES) + [_ints("join", [0, 0, -1])])
    model = _imported(path, tmp_path)
    (layer,) = model.spec.layers
    assert layer.kind == "bidirectional" and layer.config["merge_mode"] == "concat"
    assert layer.config["backward"]["go_backwards"] and layer.config["forward"]["reset_after"]

    def random_h0(batch):
        h0 = np.random.default_rng(batch).normal(0, 0.5, (2, batch, UNITS)).astype(np.float32)
        return {"h0": h0}, [h0[0], h0[1]]  # the engine's initial_state: one (batch, units) per direction
    _assert_matches_onnxruntime(path, model, random_h0)
    _assert_matches_onnxruntime(path, model, lambda batch: ({"h0": np.zeros((2, batch, UNITS), np.float32)}, None))


def _pytorch_zero_h0(layers: int, units: int) -> tuple[list, list]:
    """torch.zeros(layers, batch, units) as traced: Shape -> Gather -> Unsqueeze -> Concat -> ConstantOfShape."""
    nodes = [helper.make_node("Shape", ["input"], ["input_shape"]),
             helper.make_node("Gather", ["input_shape", "zero"], ["batch"], axis=0),
             helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"]),
             helper.make_node("Concat", ["layers", "batch_1d", "units"], ["h0_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32)))]
    initializers = [numpy_helper.from_array(np.array(0, np.int64), "zero"), _ints("axis0", [0]),
                    _ints("layers", [layers]), _ints("units", [units])]
    return nodes, initializers


def test_pytorch_two_layer_gru_batch_first_then_linear(tmp_path):
    """nn.GRU(3, 5, num_layers=2, batch_first=True) -> nn.Linear(5, 2) on every step, as torch.onnx writes it."""
    units, outputs = 5, 2
    zero_nodes, zero_initializers = _pytorch_zero_h0(2, units)
    rng = np.random.default_rng(7)
    linear_weight = rng.normal(0, 0.5, (outputs, units)).astype(np.float32)  # torch layout (out, in)
    nodes = zero_nodes + [
        _to_time_major(),
        helper.make_node("Slice", ["h0", "start0", "end1", "axis0"], ["h0_0"]),
        helper.make_node("Slice", ["h0", "end1", "end2", "axis0"], ["h0_1"]),
        helper.make_node("GRU", ["x_t", "l0.W", "l0.R", "l0.B", "", "h0_0"], ["Y0", "Y0_h"], name="gru_l0",
                         hidden_size=units, linear_before_reset=1),
        helper.make_node("Squeeze", ["Y0", "axis1"], ["Y0_s"]),
        helper.make_node("GRU", ["Y0_s", "l1.W", "l1.R", "l1.B", "", "h0_1"], ["Y1", "Y1_h"], name="gru_l1",
                         hidden_size=units, linear_before_reset=1),
        helper.make_node("Squeeze", ["Y1", "axis1"], ["Y1_s"]),
        helper.make_node("Transpose", ["Y1_s"], ["gru_out"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["gru_out", "fc.weight_t"], ["fc_mm"], name="fc/MatMul"),
        helper.make_node("Add", ["fc.bias", "fc_mm"], ["output"], name="fc/Add")]  # torch puts the bias first
    initializers = zero_initializers + _gru_weights(2, 1, units, FEATURES, "l0.") \
        + _gru_weights(3, 1, units, units, "l1.") + [
        _ints("start0", [0]), _ints("end1", [1]), _ints("end2", [2]), _ints("axis1", [1]),
        numpy_helper.from_array(np.ascontiguousarray(linear_weight.T), "fc.weight_t"),
        numpy_helper.from_array(rng.normal(0, 0.5, outputs).astype(np.float32), "fc.bias")]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])],
                 [_value("output", ["batch", "time", outputs])], initializers)
    model = _imported(path, tmp_path)
    assert [layer.kind for layer in model.spec.layers] == ["gru", "gru", "dense"]
    assert model.spec.layers[2].config == {"units": outputs, "activation": "linear", "use_bias": True}
    _assert_matches_onnxruntime(path, model)


def test_pytorch_last_step_then_gemm(tmp_path):
    """out[:, -1, :] (a Gather on time) -> nn.Linear as Gemm(transB=1) -> tanh: Keras return_sequences=False.

    This h0 is a zero scalar Expanded to a Cast shape, the other way traced torch.zeros turns up.
    """
    rng = np.random.default_rng(8)
    zero_nodes, zero_initializers = _pytorch_zero_h0(1, UNITS)
    zero_nodes[-1] = helper.make_node("Cast", ["h0_shape"], ["h0_shape_int"], to=TensorProto.INT64)
    zero_nodes.append(helper.make_node("Expand", ["zero_float", "h0_shape_int"], ["h0"]))
    nodes = zero_nodes + [
        _to_time_major(),
        helper.make_node("GRU", ["x_t", "W", "R", "B", "", "h0"], ["Y"], name="gru", hidden_size=UNITS,
                         linear_before_reset=1),
        helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"]),
        helper.make_node("Transpose", ["Y_s"], ["Y_bt"], perm=[1, 0, 2]),
        helper.make_node("Gather", ["Y_bt", "last"], ["Y_last"], axis=1),
        helper.make_node("Gemm", ["Y_last", "fc.weight", "fc.bias"], ["fc"], name="fc", transB=1),
        helper.make_node("Tanh", ["fc"], ["output"])]
    initializers = zero_initializers + _gru_weights(4, 1, UNITS, FEATURES) + [
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero_float"),
        _ints("axis1", [1]), numpy_helper.from_array(np.array(-1, np.int64), "last"),
        numpy_helper.from_array(rng.normal(0, 0.5, (2, UNITS)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.normal(0, 0.5, 2).astype(np.float32), "fc.bias")]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])], [_value("output", ["batch", 2])],
                 initializers)
    model = _imported(path, tmp_path)
    gru, dense = model.spec.layers
    assert not gru.config["return_sequences"] and dense.config["activation"] == "tanh"
    _assert_matches_onnxruntime(path, model)


def _reverse_gru_nodes(reverse_back: bool) -> list:
    """A reverse GRU, linear_before_reset=0, hard_sigmoid / linear activations as onnx_writer writes them."""
    nodes = [_to_time_major(),
             helper.make_node("GRU", ["x_t", "W", "R", "B"], ["Y", "Y_h"], name="backwards", hidden_size=UNITS,
                              direction="reverse", activations=["HardSigmoid", "Affine"],
                              activation_alpha=[1 / 6, 1.0], activation_beta=[0.5, 0.0]),
             helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"])]
    if reverse_back:  # Keras go_backwards returns the processing order
        nodes.append(helper.make_node("Slice", ["Y_s", "minus1", "before_start", "axis0", "minus1"], ["Y_s_rev"]))
    nodes += [helper.make_node("Transpose", ["Y_s_rev" if reverse_back else "Y_s"], ["output"], perm=[1, 0, 2]),
              helper.make_node("Squeeze", ["Y_h", "axis0"], ["state"])]
    return nodes


REVERSE_INITIALIZERS = [_ints("axis0", [0]), _ints("axis1", [1]), _ints("minus1", [-1]),
                        _ints("before_start", [np.iinfo(np.int64).min])]


def test_reverse_gru_is_keras_go_backwards_with_state(tmp_path):
    path = _save(tmp_path, _reverse_gru_nodes(reverse_back=True), [_value("input", ["batch", "time", FEATURES])],
                 [_value("output", ["batch", "time", UNITS]), _value("state", ["batch", UNITS])],
                 _gru_weights(5, 1, UNITS, FEATURES) + REVERSE_INITIALIZERS)
    model = _imported(path, tmp_path)
    config = model.spec.layers[0].config
    assert config["go_backwards"] and config["return_state"] and not config["reset_after"]
    assert (config["recurrent_activation"], config["activation"]) == ("hard_sigmoid", "linear")
    _assert_matches_onnxruntime(path, model)


def test_forward_gru_over_reversed_input_is_go_backwards(tmp_path):
    nodes = [_to_time_major(),
             helper.make_node("Slice", ["x_t", "minus1", "before_start", "axis0", "minus1"], ["x_rev"]),
             helper.make_node("GRU", ["x_rev", "W", "R", "B"], ["", "Y_h"], name="gru", hidden_size=UNITS),
             helper.make_node("Squeeze", ["Y_h", "axis0"], ["output"])]
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])], [_value("output", ["batch", UNITS])],
                 _gru_weights(11, 1, UNITS, FEATURES) + REVERSE_INITIALIZERS)
    model = _imported(path, tmp_path)
    assert model.spec.layers[0].config["go_backwards"]
    _assert_matches_onnxruntime(path, model)


MERGES = {
    "concat": [helper.make_node("Concat", ["h_f", "h_b"], ["output"], axis=-1)],
    "sum": [helper.make_node("Add", ["h_f", "h_b"], ["output"])],
    "mul": [helper.make_node("Mul", ["h_f", "h_b"], ["output"])],
    "ave": [helper.make_node("Add", ["h_f", "h_b"], ["h_sum"]), helper.make_node("Div", ["h_sum", "two"], ["output"])],
}


@pytest.mark.parametrize("mode", list(MERGES))
def test_final_states_of_two_directions_merge_like_keras(tmp_path, mode):
    nodes = [_to_time_major(),
             helper.make_node("GRU", ["x_t", "W", "R"], ["", "Y_h"], name="bigru", hidden_size=UNITS,
                              direction="bidirectional"),
             helper.make_node("Gather", ["Y_h", "zero"], ["h_f"], axis=0),
             helper.make_node("Gather", ["Y_h", "one"], ["h_b"], axis=0)] + MERGES[mode]
    initializers = _gru_weights(6, 2, UNITS, FEATURES)[:2] + [
        numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    width = 2 * UNITS if mode == "concat" else UNITS
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES])], [_value("output", ["batch", width])],
                 initializers)
    model = _imported(path, tmp_path)
    (layer,) = model.spec.layers
    assert layer.config["merge_mode"] == mode and not layer.config["forward"]["use_bias"]
    _assert_matches_onnxruntime(path, model)


# ----- graphs that must be refused -----

def _single_gru(attributes=None, gru_inputs=("x_t", "W", "R", "B"), op="GRU", weights=None, extra_inputs=(),
                extra_initializers=()):
    """input -> Transpose -> one GRU -> Squeeze -> Transpose -> output, with one thing changed."""
    nodes = [_to_time_major(),
             helper.make_node(op, list(gru_inputs), ["Y"], name="the_gru", hidden_size=UNITS, **(attributes or {})),
             helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"]),
             helper.make_node("Transpose", ["Y_s"], ["output"], perm=[1, 0, 2])]
    initializers = [*(weights or _gru_weights(9, 1, UNITS, FEATURES)), _ints("axis1", [1]), *extra_initializers]
    return (nodes, [_value("input", ["batch", "time", FEATURES])] + list(extra_inputs),
            [_value("output", ["batch", "time", UNITS])], initializers)


def _state_of_first_layer():
    """Two GRUs; the graph returns the second one's sequence and the first one's final state."""
    nodes = [_to_time_major(),
             helper.make_node("GRU", ["x_t", "W", "R", "B"], ["Y", "first_h"], name="first", hidden_size=UNITS),
             helper.make_node("Squeeze", ["Y", "axis1"], ["Y_s"]),
             helper.make_node("GRU", ["Y_s", "second.W", "second.R"], ["Y2"], name="second", hidden_size=UNITS),
             helper.make_node("Squeeze", ["Y2", "axis1"], ["Y2_s"]),
             helper.make_node("Transpose", ["Y2_s"], ["output"], perm=[1, 0, 2]),
             helper.make_node("Squeeze", ["first_h", "axis0"], ["state"])]
    initializers = _gru_weights(9, 1, UNITS, FEATURES) + _gru_weights(10, 1, UNITS, UNITS, "second.")[:2] + [
        _ints("axis0", [0]), _ints("axis1", [1])]
    return (nodes, [_value("input", ["batch", "time", FEATURES])],
            [_value("output", ["batch", "time", UNITS]), _value("state", ["batch", UNITS])], initializers)


def _residual_add():
    """GRU output + the model input: a branch, not a chain."""
    nodes, inputs, _, initializers = _single_gru(weights=_gru_weights(9, 1, FEATURES, FEATURES))
    nodes[1] = helper.make_node("GRU", ["x_t", "W", "R", "B"], ["Y"], name="the_gru", hidden_size=FEATURES)
    nodes[-1] = helper.make_node("Transpose", ["Y_s"], ["gru_out"], perm=[1, 0, 2])
    nodes.append(helper.make_node("Add", ["gru_out", "input"], ["output"], name="residual"))
    return nodes, inputs, [_value("output", ["batch", "time", FEATURES])], initializers


def _direction_axis_output():
    """Both directions of a bidirectional GRU returned as (batch, time, 2, units)."""
    nodes, inputs, _, initializers = _single_gru(attributes={"direction": "bidirectional"},
                                                 weights=_gru_weights(9, 2, UNITS, FEATURES))
    nodes[2:] = [helper.make_node("Transpose", ["Y"], ["output"], perm=[2, 0, 1, 3])]
    return nodes, inputs, [_value("output", ["batch", "time", 2, UNITS])], initializers


def _time_major_input():
    """No Transpose before the GRU: the model input is (time, batch, features), as the node reads it."""
    nodes, inputs, outputs, initializers = _single_gru(gru_inputs=("input", "W", "R", "B"))
    return nodes[1:], [_value("input", ["time", "batch", FEATURES])], outputs, initializers


@pytest.mark.parametrize("build", [_direction_axis_output, _time_major_input])
def test_graph_layouts_run_through_the_session(tmp_path, build):
    """Graphs once refused: a stacked direction axis in the output, a time-major input."""
    path = _save(tmp_path, *build())
    session = gru_engine.InferenceSession(import_onnx(path, tmp_path / "g.gru.safetensors"))
    x = np.random.default_rng(0).standard_normal((5, 2, FEATURES)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for actual, wanted in zip(session.run(None, {"input": x}), expected):
        assert max_excess(actual, wanted) <= 0


BAD_GRAPHS = {
    "lstm-with-gru-weights": (lambda: _single_gru(op="LSTM"), BundleError,
                              r"the_gru.*W is float32 \(1, 12, 3\); expected float32 \(1, 16, 3\)"),
    "clip-negative": (lambda: _single_gru({"clip": -3.0}), BundleError, r"the_gru.*clip is -3.0"),
    "lengths-zero": (lambda: _single_gru(gru_inputs=("x_t", "W", "R", "B", "lens"), extra_initializers=[
        numpy_helper.from_array(np.array([0], np.int32), "lens")]), BundleError, r"the_gru.*at least 1"),
    "lengths-float": (lambda: _single_gru(gru_inputs=("x_t", "W", "R", "B", "lens"), extra_initializers=[
        numpy_helper.from_array(np.array([2.0], np.float32), "lens")]), UnsupportedModelError,
        r"the_gru.*sequence_lens is a constant"),
    "initial-h-shape": (lambda: _single_gru(gru_inputs=("x_t", "W", "R", "B", "", "h0"), extra_initializers=[
        numpy_helper.from_array(np.ones((2, 1, UNITS), np.float32), "h0")]), BundleError, r"the_gru.*initial_h"),
    "gelu": (lambda: _single_gru({"activations": ["Sigmoid", "Gelu"]}), UnsupportedModelError,
             r"Gelu is not one of ONNX's RNN activations"),
    "layout-2": (lambda: _single_gru({"layout": 2}), BundleError, r"layout is 2"),
    "weight-is-an-input": (lambda: _single_gru(gru_inputs=("x_t", "Wi", "R", "B"),
                                               extra_inputs=[_value("Wi", [1, 3 * UNITS, FEATURES])]),
                           BundleError, r"the_gru.*W must be a constant"),
    "weight-shape": (lambda: _single_gru(weights=_gru_weights(9, 1, UNITS, FEATURES + 2)), BundleError,
                     r"the_gru.*W is float32 \(1, 12, 5\); expected float32 \(1, 12, 3\)"),
    "undefined-tensor": (lambda: _single_gru(gru_inputs=("x_t", "W", "R", "nowhere")), BundleError,
                         r"not a valid ONNX model"),
    "state-of-first-layer": (_state_of_first_layer, UnsupportedModelError, r"outputs of several GRU nodes"),
    "residual-add": (_residual_add, UnsupportedModelError, r"residual.*adds two tensors"),
}


def _assert_refused(tmp_path, build, error, message) -> None:
    """Importing the graph ``build()`` makes raises ``error`` with ``message``, and writes no bundle."""
    path = _save(tmp_path, *build(), check=False)
    out = tmp_path / "refused.gru.safetensors"
    with pytest.raises(error, match=message):
        import_onnx(path, out)
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_unsupported_or_malformed_graphs_are_refused(tmp_path, case):
    _assert_refused(tmp_path, *BAD_GRAPHS[case])


def test_float64_model_input_is_refused(tmp_path):
    nodes, _, outputs, initializers = _single_gru()
    path = _save(tmp_path, nodes, [_value("input", ["batch", "time", FEATURES], TensorProto.DOUBLE)], outputs,
                 initializers, check=False)
    with pytest.raises(UnsupportedModelError, match="not float32"):
        import_onnx(path, tmp_path / "out.gru.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage that is not protobuf \xff\xfe", b"not onnx at all"])
def test_files_that_are_not_onnx_are_refused(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(BundleError, match="broken.onnx: not a valid ONNX model"):
        import_onnx(path, tmp_path / "out.gru.safetensors")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(BundleError, match="no such ONNX file"):
        import_onnx(tmp_path / "missing.onnx", tmp_path / "out.gru.safetensors")
