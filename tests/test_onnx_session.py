"""ONNX GRU graphs in every form the standard allows, run through ``gru_engine.InferenceSession``.

Oracles: the ONNX project's own GRU node test cases (inputs and expected outputs), onnxruntime on
the same graph and feeds, and ``reference.onnx_gru`` (the operator's equations in float64) where
onnxruntime refuses the graph (layout=1).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import gru_engine
from gru_engine import BundleError, InputError, bundle, spec as spec_module
from gru_engine.exporters import import_onnx, onnx_session
from gru_engine.spec import Layer, max_excess

from reference import gru_config, onnx_gru, random_spec, recurrent_config, reference_predict

MODERATE = 100.0  # outputs beyond this magnitude come from a blown-up recurrence
ACTIVATION_NAMES = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
                    "Elu", "Softsign", "Softplus"]


def _close(actual, expected):
    assert actual.shape == expected.shape
    assert max_excess(np.asarray(actual, np.float32), np.asarray(expected, np.float32)) <= 0


def _save(path, nodes, inputs, outputs, initializers, producer="test", opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def _onnx_node_cases():
    """The ONNX project's test_gru_* cases: each GRU.export_* builds a node, its inputs and expected
    outputs and hands them to ``expect``, caught here (onnx's own collector builds every operator's)."""
    from onnx.backend.test.case.node import gru as gru_cases

    found = []
    original = gru_cases.expect
    gru_cases.expect = lambda node, inputs, outputs, name, **kwargs: found.append((name, node, inputs, outputs))
    try:
        for name in sorted(dir(gru_cases.GRU)):
            if name.startswith("export"):
                getattr(gru_cases.GRU, name)()
    finally:
        gru_cases.expect = original
    return found


@pytest.mark.parametrize("case", _onnx_node_cases(), ids=lambda case: case[0])
def test_onnx_node_test_cases(tmp_path, case):
    """Each case's node in a graph of its own, weights as initializers, X as the graph input: the
    session (converted on the fly, and from a bundle) returns the expected outputs."""
    _, node, inputs, outputs = case
    present = [name for name in node.input if name]
    initializers = [numpy_helper.from_array(array, name) for name, array in zip(present[1:], inputs[1:])]
    x = inputs[0]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(y.shape))
                     for name, y in zip([name for name in node.output if name], outputs)]
    path = _save(tmp_path / "case.onnx", [node], [helper.make_tensor_value_info(present[0], TensorProto.FLOAT,
                                                                                 list(x.shape))],
                 graph_outputs, initializers, producer="backend-test")
    for session in (onnx_session(path), gru_engine.InferenceSession(import_onnx(path, tmp_path / "b.safetensors"))):
        assert [o.name for o in session.get_outputs()] == [name for name in node.output if name]
        for actual, expected in zip(session.run(None, {present[0]: x}), outputs):
            _close(actual, expected)


def _single_gru_graph(path, draw_values, rng):
    """One GRU node with the drawn attributes and optional sequence_lens / initial_h (graph input or
    constant); returns (path, node attributes and arrays for the reference, feeds)."""
    (layout, direction, lbr, units, features, batch, steps, activations, alphas, betas, clip, lens_kind, h_kind,
     outputs) = draw_values
    count = 2 if direction == "bidirectional" else 1
    w = rng.normal(0, 0.5, (count, 3 * units, features)).astype(np.float32)
    r = rng.normal(0, 0.5, (count, 3 * units, units)).astype(np.float32)
    b = rng.normal(0, 0.3, (count, 6 * units)).astype(np.float32)
    x_shape = (steps, batch, features) if layout == 0 else (batch, steps, features)
    x = rng.standard_normal(x_shape).astype(np.float32)
    lengths = rng.integers(1, steps + 1, batch).astype(np.int32)
    h_shape = (count, batch, units) if layout == 0 else (batch, count, units)
    h0 = rng.normal(0, 0.5, h_shape).astype(np.float32)
    initializers = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["a", "b", features])]
    feeds = {"X": x}
    if lens_kind == "input":
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"]))
        feeds["lens"] = lengths
    elif lens_kind == "constant":
        initializers.append(numpy_helper.from_array(lengths, "lens"))
    if h_kind == "input":
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, list(h_shape)))
        feeds["h0"] = h0
    elif h_kind == "constant":
        initializers.append(numpy_helper.from_array(h0, "h0"))
    attributes = dict(hidden_size=units, direction=direction, linear_before_reset=lbr, activations=activations)
    if layout:
        attributes["layout"] = 1
    if alphas:
        attributes["activation_alpha"] = alphas
    if betas:
        attributes["activation_beta"] = betas
    if clip is not None:
        attributes["clip"] = clip
    node = helper.make_node("GRU", ["X", "W", "R", "B", "lens" if lens_kind else "", "h0" if h_kind else ""],
                            [name if name in outputs else "" for name in ("Y", "Y_h")], **attributes)
    expected = onnx_gru(x, w, r, b, lengths if lens_kind else None, h0 if h_kind else None, direction, lbr, layout,
                        activations, alphas, betas, clip)
    expected = [e for name, e in zip(("Y", "Y_h"), expected) if name in outputs]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * e.ndim)
                     for name, e in zip(outputs, expected)]
    _save(path, [node], inputs, graph_outputs, initializers)
    if lens_kind == "constant":
        feeds = {k: v for k, v in feeds.items() if k != "lens"}
    return expected, feeds


GRAPHS = st.tuples(
    st.sampled_from([0, 1]), st.sampled_from(["forward", "reverse", "bidirectional"]), st.sampled_from([0, 1]),
    st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6),
    st.lists(st.sampled_from(ACTIVATION_NAMES), min_size=4, max_size=4),
    st.lists(st.floats(0.0625, 1.5, width=32), max_size=4), st.lists(st.floats(-0.5, 0.5, width=32), max_size=4),
    st.sampled_from([None, 0.5, 3.0]), st.sampled_from([None, "input", "constant"]),
    st.sampled_from([None, "input", "constant"]), st.sampled_from([("Y",), ("Y_h",), ("Y", "Y_h")]))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(values=GRAPHS, seed=st.integers(0, 2**16))
def test_random_gru_graphs_match_the_operator_and_onnxruntime(tmp_path_factory, values, seed):
    """Random single-GRU graphs over the attribute space: the session equals ONNX's equations, and
    onnxruntime on the same feeds (where it runs the graph: layout 0)."""
    values = list(values)
    count = 2 if values[1] == "bidirectional" else 1
    values[7] = values[7][:2 * count]
    path = tmp_path_factory.mktemp("graphs") / "random.onnx"
    expected, feeds = _single_gru_graph(path, values, np.random.default_rng(seed))
    # Unbounded gate activations (Relu, Softplus, ... as f) can make the carry grow doubly
    # exponentially: such draws say nothing about parity (float32 overflows), so they are skipped.
    assume(all(np.abs(e).max() < MODERATE for e in expected))
    try:
        session = onnx_session(path)
    except BundleError as error:  # the same blow-up on the import's own self-check input
        assume("NaN or infinite" not in str(error))
        raise
    actual = session.run(None, feeds)
    for a, e in zip(actual, expected):
        _close(a, e)
    if values[0] == 0:
        for a, e in zip(actual, ort.InferenceSession(str(path)).run(None, feeds)):
            _close(a, e)


def _stacked_graph(path):
    """PyTorch's layout for a 2-layer bidirectional GRU with sequence_lens and initial_h graph inputs:
    GRU -> Transpose(0, 2, 1, 3) -> Reshape (T, B, 2H) -> GRU -> Y, Y_h."""
    rng = np.random.default_rng(3)
    units, features = 4, 3
    init = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name) for name, shape in (
        ("W0", (2, 3 * units, features)), ("R0", (2, 3 * units, units)), ("B0", (2, 6 * units)),
        ("W1", (1, 3 * units, 2 * units)), ("R1", (1, 3 * units, units)), ("B1", (1, 6 * units)))]
    init.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape"))
    nodes = [helper.make_node("Slice", ["h0", "s0", "s2", "ax"], ["h0_a"]),
             helper.make_node("Slice", ["h0", "s2", "s3", "ax"], ["h0_b"]),
             helper.make_node("GRU", ["X", "W0", "R0", "B0", "lens", "h0_a"], ["Y0", ""], hidden_size=units,
                              direction="bidirectional", linear_before_reset=1),
             helper.make_node("Transpose", ["Y0"], ["Y0_t"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Y0_t", "shape"], ["Y0_r"]),
             helper.make_node("GRU", ["Y0_r", "W1", "R1", "B1", "lens", "h0_b"], ["Y", "Y_h"], hidden_size=units,
                              linear_before_reset=1)]
    init += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s2", 2), ("s3", 3),
                                                                              ("ax", 0))]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", "batch", features]),
              helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [3, "batch", units])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4),
               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "batch", units])]
    return _save(path, nodes, inputs, outputs, init)


def test_sequence_lens_input_with_unequal_lengths(tmp_path):
    path = _stacked_graph(tmp_path / "stacked.onnx")
    session = gru_engine.InferenceSession(import_onnx(path, tmp_path / "stacked.gru.safetensors"))
    reference = ort.InferenceSession(str(path))
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(i.name, i.shape) for i in reference.get_inputs()]
    rng = np.random.default_rng(0)
    feeds = {"X": rng.standard_normal((7, 4, 3)).astype(np.float32), "lens": np.int32([7, 5, 1, 3]),
             "h0": rng.normal(0, 0.5, (3, 4, 4)).astype(np.float32)}
    for names in (None, ["Y_h"], ["Y_h", "Y"]):
        for actual, expected in zip(session.run(names, feeds), reference.run(names, feeds)):
            _close(actual, expected)
    assert not session.run(["Y"], feeds)[0][5:, :, 1].any()  # zero past a sample's length


def test_predict_lengths_follow_keras_masking(tmp_path):
    """predict(x, lengths=...) for any model equals the reference with trailing steps masked."""
    layers = [Layer("bidirectional", "b", {"merge_mode": "concat", "forward": gru_config(3, return_sequences=True),
                                          "backward": gru_config(3, return_sequences=True, go_backwards=True)}),
              Layer("gru", "g", gru_config(4, activation="softsign", recurrent_activation="hard_sigmoid",
                                           recurrent_activation_alpha=0.2, clip=2.0)),
              Layer("dense", "d", {"units": 2, "activation": "linear", "use_bias": True})]
    spec = random_spec(layers, 3)
    model = gru_engine.Model(spec)
    x = np.random.default_rng(1).standard_normal((5, 6, 3)).astype(np.float32)
    lengths = np.array([6, 1, 3, 5, 2])
    _close(model.predict(x, lengths=lengths), reference_predict(spec, x, lengths=lengths)[0])
    _close(model.predict(x, lengths=np.full(5, 6)), model.predict(x))
    for bad, message in ((np.array([6, 0, 3, 5, 2]), "between 1 and"), (np.array([7, 1, 1, 1, 1]), "between 1 and"),
                         (np.array([1.5] * 5), "integer"), (np.array([1, 2]), "shape")):
        with pytest.raises(InputError, match=message):
            model.predict(x, lengths=bad)


CAUSAL = {"filters": 3, "kernel_size": 2, "strides": 1, "padding": "causal", "dilation_rate": 2, "groups": 1,
          "activation": "relu", "use_bias": True}
LENGTHS_CHAINS = {
    "lstm-stack": [Layer("masking", "m", {"mask_value": 0.0}),
                   Layer("lstm", "l", recurrent_config("lstm", 3, return_sequences=True)),
                   Layer("simple_rnn", "s", recurrent_config("simple_rnn", 2, go_backwards=True))],
    "bidirectional-lstm": [Layer("bidirectional", "b", {
        "merge_mode": "sum", "layer": "lstm", "forward": recurrent_config("lstm", 3, return_sequences=True),
        "backward": recurrent_config("lstm", 3, return_sequences=True, go_backwards=True)})],
    "causal-conv-then-gru": [Layer("conv1d", "c", CAUSAL),
                             Layer("batch_normalization", "n", {"epsilon": 1e-3, "center": True, "scale": True}),
                             Layer("gru", "g", gru_config(3, return_sequences=True)),
                             Layer("global_average_pooling1d", "p", {})],
}


@pytest.mark.parametrize("name", list(LENGTHS_CHAINS))
def test_predict_lengths_for_every_recurrent_family_and_causal_front_ends(name):
    spec = random_spec(LENGTHS_CHAINS[name], 3, seed=4)
    x = np.random.default_rng(2).standard_normal((4, 7, 3)).astype(np.float32)
    x[0, 2] = 0.0  # a Masking layer's step inside the first sample's length
    lengths = np.array([7, 2, 5, 1])
    _close(gru_engine.Model(spec).predict(x, lengths=lengths), reference_predict(spec, x, lengths=lengths)[0])


@pytest.mark.parametrize("layer, reason", [
    (Layer("conv1d", "strided", dict(CAUSAL, strides=2, dilation_rate=1)), "'strided' \\(Conv1D\\) has strides 2"),
    (Layer("conv1d", "centred", dict(CAUSAL, padding="same")), "'centred' \\(Conv1D\\) has padding 'same'"),
    (Layer("max_pooling1d", "pool", {"pool_size": 2, "strides": 2, "padding": "valid"}), "'pool' \\(MaxPooling1D\\)"),
])
def test_predict_lengths_refused_through_front_ends_that_move_steps(layer, reason):
    spec = random_spec([layer, Layer("gru", "g", gru_config(3))], 3, check_shape=(2, 8))
    model = gru_engine.Model(spec)
    x = np.ones((2, 8, 3), np.float32)
    with pytest.raises(InputError, match=f"lengths= cannot be honoured: layer {reason}"):
        model.predict(x, lengths=np.array([8, 3]))
    model.predict(x)  # without lengths, the model runs


@pytest.fixture(scope="module")
def stacked_session(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stacked")
    return gru_engine.InferenceSession(import_onnx(_stacked_graph(tmp_path / "g.onnx"), tmp_path / "g.safetensors"))


def _good_feeds():
    return {"X": np.zeros((5, 2, 3), np.float32), "lens": np.int32([5, 2]), "h0": np.zeros((3, 2, 4), np.float32)}


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("lens"), r"lacks \['lens'\]"),
    (lambda f: f.update(extra=f["X"]), r"unknown inputs \['extra'\]"),
    (lambda f: f.update(X=f["X"].astype(np.float64)), "dtype float64.*float32"),
    (lambda f: f.update(lens=f["lens"].astype(np.int64)), "dtype int64.*int32"),
    (lambda f: f.update(X=f["X"][:, :, :2]), r"shape \(5, 2, 2\)"),
    (lambda f: f.update(X=f["X"][None]), "shape"),
    (lambda f: f.update(h0=f["h0"][:, :1]), "batch size 1"),
    (lambda f: f.update(lens=np.int32([6, 2])), "between 1 and the 5 time steps"),
    (lambda f: f.update(lens=np.int32([-1, 2])), "between 1 and"),
    (lambda f: f.update(X=np.full((5, 2, 3), np.nan, np.float32)), "NaN"),
])
def test_bad_feeds_are_refused(stacked_session, change, message):
    feeds = _good_feeds()
    change(feeds)
    with pytest.raises(InputError, match=message):
        stacked_session.run(None, feeds)


def test_bad_output_names_are_refused(stacked_session):
    with pytest.raises(InputError, match="unknown output names"):
        stacked_session.run(["Z"], _good_feeds())
    with pytest.raises(InputError, match="list of output names"):
        stacked_session.run("Y", _good_feeds())


def test_bundle_versions(tmp_path, monkeypatch):
    """Interface bundles are version 2, which an older reader refuses; others stay version 1 and load."""
    imported = import_onnx(_stacked_graph(tmp_path / "g.onnx"), tmp_path / "g.safetensors")
    plain = bundle.save(random_spec([Layer("gru", "g", gru_config(2))], 2), tmp_path / "plain.safetensors")

    def version(path):
        header_length = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8:8 + header_length])
        return json.loads(header["__metadata__"]["gru_engine"])["format_version"]

    assert (version(imported), version(plain)) == (2, 1)
    gru_engine.load(plain)
    with pytest.raises(BundleError, match="records no ONNX graph interface"):
        gru_engine.InferenceSession(plain)
    monkeypatch.setattr(bundle, "READABLE_VERSIONS", (1,))  # what a release before version 2 accepts
    with pytest.raises(BundleError, match="format_version 2; this gru-engine reads versions \\[1\\]. Upgrade"):
        gru_engine.load(imported)
    gru_engine.load(plain)


def test_dynamo_graph_with_linear_before_reset_0_warns(tmp_path):
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n)
            for n, s in (("W", (1, 6, 3)), ("R", (1, 6, 2)), ("B", (1, 12)))]
    node = helper.make_node("GRU", ["X", "W", "R", "B"], ["", "Y_h"], hidden_size=2, linear_before_reset=0)
    path = _save(tmp_path / "g.onnx", [node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 1, 3])],
                 [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 1, 2])], init, producer="pytorch")
    with pytest.warns(UserWarning, match="linear_before_reset=0 in a graph written by PyTorch"):
        onnx_session(path)


def test_inspect_shows_producer_and_interface(tmp_path, capsys):
    from gru_engine.cli import main

    imported = import_onnx(_stacked_graph(tmp_path / "g.onnx"), tmp_path / "g.safetensors")
    main(["inspect", str(imported)])
    shown = capsys.readouterr().out
    assert "format version 2" in shown and "Producer: test" in shown
    assert "graph input  lens (lengths): ['batch']" in shown


def test_spec_refuses_parameters_an_activation_does_not_take():
    spec = random_spec([Layer("gru", "g", gru_config(2, activation="softsign"))], 2)
    spec.layers[0].config["activation_alpha"] = 0.5
    with pytest.raises(BundleError, match="softsign takes no alpha"):
        spec_module.validate(spec)
