"""Conv1D, pooling and BatchNormalization: parity with real Keras and the NumPy reference, streaming,
and refusals.

The Conv1D matrix is padding x (strides, dilation) x groups; each case stacks two convolutions with
different kernel sizes, so kernel sizes 1 to 5 all appear under every padding. Pooling cases stack
MaxPooling1D and AveragePooling1D over pool sizes x strides, both paddings.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gru_engine
from gru_engine import InputError, bundle
from gru_engine.exporters import export_onnx, keras_reader
from gru_engine.exporters.onnx_reader import read_onnx
from gru_engine.runtime import Model
from gru_engine.spec import Layer, max_excess
from models import build_model, random_input
from reference import gru_config, random_spec, reference_predict

BATCHES = (1, 5, 9)


def _conv(filters, kernel_size, **options):
    return {"kind": "conv1d", "filters": filters, "kernel_size": kernel_size, **options}


def _gru(units, **options):
    return {"kind": "gru", "units": units, **options}


def _cases() -> dict[str, tuple[list, int]]:
    """name -> (layers, features)."""
    cases = {}
    shapes = [(1, 1), (2, 1), (1, 2), (3, 1)]  # (strides, dilation); Keras refuses both above 1
    for index, (padding, (strides, dilation), groups) in enumerate(
            itertools.product(("valid", "same", "causal"), shapes, (1, 2))):
        first, second = 1 + index % 5, 1 + (index + 2) % 5
        activation = ("linear", "relu", "tanh", "sigmoid")[index % 4]
        cases[f"conv-{padding}-s{strides}-d{dilation}-g{groups}-k{first}{second}"] = ([
            _conv(4, first, strides=strides, dilation_rate=dilation, padding=padding, groups=groups,
                  activation=activation),
            _conv(6, second, strides=strides, dilation_rate=dilation, padding=padding, groups=groups,
                  use_bias=index % 3 != 0),
            _gru(3, return_sequences=True)], 4)
    for size, strides in itertools.product((1, 2, 3), (1, 2, None)):
        first, second = ("valid", "same") if (size + (strides or 0)) % 2 else ("same", "valid")
        cases[f"pool-{size}-s{strides}"] = ([
            _conv(4, 2, padding="same"),
            {"kind": "max_pooling1d", "pool_size": size, "strides": strides, "padding": first},
            {"kind": "average_pooling1d", "pool_size": size, "strides": strides, "padding": second},
            _gru(3, return_sequences=True)], 3)
    cases["bn-folded-after-conv"] = ([_conv(5, 3), {"kind": "batch_normalization"}, _gru(4)], 3)
    cases["bn-applied-after-relu-conv"] = ([_conv(5, 3, activation="relu"),
                                            {"kind": "batch_normalization", "center": False}, _gru(4)], 3)
    cases["bn-before-and-after-gru"] = ([{"kind": "batch_normalization", "scale": False}, _gru(6, return_sequences=True),
                                         {"kind": "batch_normalization", "epsilon": 0.1}, _gru(3)], 3)
    cases["bn-after-dense"] = ([_gru(5, return_sequences=True), {"kind": "dense", "units": 4},
                                {"kind": "batch_normalization"}, {"kind": "global_max_pooling1d"}], 2)
    cases["masking-global-average"] = ([{"kind": "masking", "mask_value": 0.0}, _gru(5, return_sequences=True),
                                        {"kind": "batch_normalization"}, {"kind": "global_average_pooling1d"},
                                        {"kind": "dense", "units": 2}], 3)
    cases["masking-conv-drops-mask"] = ([{"kind": "masking", "mask_value": 0.0}, _conv(4, 3, padding="causal"),
                                         _gru(3, return_sequences=True), {"kind": "global_average_pooling1d"}], 3)
    cases["gru-conv-gru"] = ([_gru(6, return_sequences=True), _conv(4, 3, padding="same", activation="tanh"),
                              {"kind": "max_pooling1d", "pool_size": 2}, _gru(3)], 2)
    cases["guitar-shaped"] = ([_conv(8, 12, strides=4, padding="same", activation="tanh"),
                               _conv(8, 12, strides=3, padding="same", activation="tanh"), _gru(12),
                               {"kind": "dense", "units": 1}], 1)
    cases["causal-dilated-stack"] = ([_conv(6, 2, padding="causal", dilation_rate=1, activation="tanh"),
                                      _conv(6, 2, padding="causal", dilation_rate=2, activation="tanh"),
                                      _conv(6, 2, padding="causal", dilation_rate=4, activation="tanh"),
                                      _gru(5, return_sequences=True), {"kind": "dense", "units": 1}], 1)
    return cases


CASES = _cases()
MASKED = {"masking-global-average", "masking-conv-drops-mask"}


def _input(name: str, index: int, features: int) -> np.ndarray:
    batch = BATCHES[index % len(BATCHES)]
    x = random_input(batch, 41 if name == "guitar-shaped" else 23, features, seed=200 + index,
                     mask_value=0.0 if name in MASKED else None)
    if name in MASKED:
        x[-1, :] = 0.0
        x[-1, 5] = 1.0  # the last sample keeps one step: every sample has one unmasked step
    return x


def assert_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
        excess = max_excess(np.asarray(a), np.asarray(e))
        assert excess <= 0, f"{what}: {excess:.3g} beyond the parity tolerance"


def onnxruntime_run(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize("index, name", list(enumerate(CASES)), ids=list(CASES))
def test_engine_and_native_onnx_match_keras_and_reference(name, index, tmp_path):
    """Engine vs Keras and the reference; without Masking (which native ONNX cannot express), the
    native ONNX export vs Keras in onnxruntime, and that file imported back vs Keras in the engine."""
    layers, features = CASES[name]
    keras_model = build_model(layers, features, seed=index)
    spec = keras_reader.read_keras(keras_model)  # replays the self-check in the engine
    x = _input(name, index, features)
    expected = [np.asarray(keras_model(x, training=False))]
    reference = reference_predict(spec, x)
    assert_close(reference, expected, "reference vs keras")
    assert_close([Model(spec).predict(x)], expected, "engine vs keras")
    if name in MASKED:
        return
    path = export_onnx(spec, tmp_path / f"{name}.onnx")  # onnx.checker full_check inside
    assert_close(onnxruntime_run(path, x), expected, "onnxruntime on the native export vs keras")
    imported = read_onnx(path)  # self-checked against onnxruntime
    assert_close([Model(imported).predict(x)], expected, "imported ONNX in the engine vs keras")


def test_tf2onnx_export_of_a_front_end_still_matches_keras(tmp_path):
    layers, features = CASES["guitar-shaped"]
    keras_model = build_model(layers + [{"kind": "batch_normalization"}], features, seed=3)
    x = _input("guitar-shaped", 0, features)
    path = export_onnx(keras_model, tmp_path / "guitar.tf2onnx.onnx", method="tf2onnx")
    assert_close(onnxruntime_run(path, x), [np.asarray(keras_model(x, training=False))], "tf2onnx vs keras")


def _spec(layers, features=2, **options):
    return random_spec([Layer(kind, f"{kind}_{index}", config) for index, (kind, config) in enumerate(layers)],
                       features, **options)


def _conv_config(filters, kernel_size, padding="causal", strides=1, dilation_rate=1, activation="tanh"):
    return {"filters": filters, "kernel_size": kernel_size, "strides": strides, "padding": padding,
            "dilation_rate": dilation_rate, "groups": 1, "activation": activation, "use_bias": True}


STREAMED = [("conv1d", _conv_config(4, 3, dilation_rate=2)), ("batch_normalization",
            {"epsilon": 1e-3, "center": True, "scale": True}), ("conv1d", _conv_config(3, 2)),
            ("conv1d", _conv_config(3, 1)), ("gru", gru_config(5, return_sequences=True))]


def test_causal_conv_stream_matches_predict_on_every_prefix_and_restores_its_state(tmp_path):
    spec = _spec(STREAMED, check_shape=(2, 9))
    model = gru_engine.load(bundle.save(spec, tmp_path / "causal.gru.safetensors"))
    x = random_input(3, 14, 2, seed=5)
    stream = model.stream(batch=3)
    # Kernel size 1 keeps no history: the carries are the first two convolutions' and the GRU's.
    assert [state.shape for state in stream.state] == [(3, 4, 2), (3, 1, 4), (3, 5)]
    saved = None
    for t in range(x.shape[1]):
        y = stream.step(x[:, t])
        assert_close([y], [model.predict(x[:, :t + 1])[:, -1]], f"step {t} vs predict on the prefix")
        if t == 6:
            saved = stream.state
            np.testing.assert_array_equal(saved[0], x[:, 3:7])  # the first layer's last 4 inputs, oldest first
    restored = model.stream(batch=3)
    restored.state = saved
    continued = restored.run(x[:, 7:])
    fresh = model.stream(batch=3)
    fresh.run(x[:, :7])
    np.testing.assert_array_equal(continued, fresh.run(x[:, 7:]))
    assert_close([continued[:, -1]], [reference_predict(spec, x)[0][:, -1]], "restored stream vs reference")
    with pytest.raises(InputError, match=r"shape \(3, 4, 2\)"):
        restored.state = [np.zeros((3, 5))] * 3


@pytest.mark.parametrize("layer, why", [
    (("conv1d", _conv_config(2, 3, padding="same")), "has padding 'same', so its output at time t depends on later"),
    (("conv1d", _conv_config(2, 3, padding="valid")), "has padding 'valid'"),
    (("conv1d", _conv_config(2, 3, strides=2)), "has strides 2"),
    (("max_pooling1d", {"pool_size": 2, "strides": 2, "padding": "valid"}), "pools several time steps"),
    (("average_pooling1d", {"pool_size": 2, "strides": 1, "padding": "same"}), "pools several time steps"),
])
def test_stream_refuses_layers_that_look_ahead_naming_the_layer(layer, why):
    model = Model(_spec([layer, ("gru", gru_config(3))], check_shape=(2, 6)))
    with pytest.raises(InputError, match=f"'{layer[0]}_0' {why}.*cannot stream"):
        model.stream()
    global_pooled = Model(_spec([("gru", gru_config(3, return_sequences=True)), ("global_max_pooling1d", {})]))
    with pytest.raises(InputError, match="'global_max_pooling1d_1' pools several time steps.*cannot stream"):
        global_pooled.stream()


def test_a_valid_window_longer_than_the_input_is_refused_naming_the_layer():
    spec = _spec([("conv1d", _conv_config(2, 3, padding="valid", dilation_rate=2)), ("gru", gru_config(3))],
                 check_shape=(1, 5))
    model = Model(spec)
    assert model.predict(np.ones((1, 5, 2))).shape == (1, 3)
    with pytest.raises(InputError, match=r"'conv1d_0' \(Conv1D, padding 'valid'\) needs at least 5 time steps"):
        model.predict(np.ones((2, 4, 2)))
    spec.self_check_input = spec.self_check_input[:, :4]
    with pytest.raises(gru_engine.BundleError, match="self-check input: .* needs at least 5 time steps"):
        Model(spec)


@pytest.mark.parametrize("kind, config, message", [
    ("conv1d", dict(_conv_config(2, 3), strides=2, dilation_rate=2), "strides > 1 with dilation_rate > 1"),
    ("conv1d", dict(_conv_config(3, 3), groups=2), "'groups' is 2"),
    ("conv1d", dict(_conv_config(2, 0)), "'kernel_size' is 0"),
    ("conv1d", dict(_conv_config(2, 3), padding="full"), "'padding' is 'full'"),
    ("conv1d", dict(_conv_config(2, 3), activation="gelu"), "'activation' is 'gelu'"),
    ("max_pooling1d", {"pool_size": 2, "strides": 1, "padding": "causal"}, "'padding' is 'causal'"),
    ("global_average_pooling1d", {"keepdims": True}, "must be empty"),
    ("batch_normalization", {"epsilon": -1.0, "center": True, "scale": True}, "'epsilon'"),
])
def test_bad_front_end_configurations_are_refused(kind, config, message):
    with pytest.raises(gru_engine.BundleError, match=message):
        Model(_spec([(kind, config), ("gru", gru_config(3))], features=4))


def test_bundle_round_trip_and_an_unknown_kind_is_refused_clearly(tmp_path):
    spec = _spec([("conv1d", _conv_config(4, 3, padding="same")), ("batch_normalization",
                   {"epsilon": 1e-3, "center": False, "scale": True}), ("average_pooling1d",
                   {"pool_size": 2, "strides": 2, "padding": "same"}), ("gru", gru_config(3))], check_shape=(2, 9))
    path = bundle.save(spec, tmp_path / "front.gru.safetensors")
    model = gru_engine.load(path)  # replays the self-check
    x = random_input(2, 10, 2)
    assert_close([model.predict(x)], reference_predict(spec, x), "loaded bundle vs reference")
    lines = []
    model.summary(print_fn=lines.append)
    assert "conv1d_0 (Conv1D)" in lines[0] and "average_pooling1d_2 (AveragePooling1D)" in lines[0]
    assert f"Total params: {(3 * 2 * 4 + 4) + 3 * 4 + (4 * 9 + 3 * 9 + 2 * 9)}" in lines[0]
    spec.layers[1].kind = "layer_norm"
    with pytest.raises(gru_engine.BundleError, match="unknown layer kind 'layer_norm'.*newer gru-engine"):
        Model(spec)


def test_batch_normalization_with_zero_variance_plus_epsilon_is_refused():
    spec = _spec([("batch_normalization", {"epsilon": 1e-3, "center": True, "scale": True}), ("gru", gru_config(3))])
    spec.layers[0].weights["moving_variance"][:] = -1e-3
    with pytest.raises(gru_engine.BundleError, match="moving_variance"):
        Model(spec)


def test_keras_front_ends_the_engine_cannot_run_are_refused_naming_the_layer():
    import keras
    for layer in (keras.layers.Conv1D(2, 3, data_format="channels_first", name="first_conv"),
                  keras.layers.MaxPooling1D(2, data_format="channels_first", name="first_pool"),
                  keras.layers.Conv1D(2, 3, activation="gelu", name="gelu_conv")):
        model = keras.Sequential([keras.Input((5, 4)), layer, keras.layers.GRU(2)])
        with pytest.raises(gru_engine.UnsupportedModelError, match=f"'{layer.name}'"):
            keras_reader.read_keras(model)


def _pytorch_style_graph(path):
    """What torch.onnx.export writes for x.transpose(1, 2) -> nn.Conv1d(3, 6, 3, padding=1) -> ReLU ->
    nn.Conv1d(6, 4, 2, stride=2, groups=2) -> BatchNorm1d -> transpose -> nn.GRU(4, 5, batch_first=True)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    initializers = [weight("w1", 6, 3, 3), weight("b1", 6), weight("w2", 4, 3, 2), weight("b2", 4),
                    weight("gamma", 4), weight("beta", 4), weight("mean", 4),
                    numpy_helper.from_array(np.abs(rng.normal(1, 0.2, 4)).astype(np.float32), "var"),
                    weight("W", 1, 15, 4), weight("R", 1, 15, 5), weight("B", 1, 30),
                    numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[2], strides=[2],
                              group=2, pads=[0, 0]),
             helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["n"], name="norm",
                              epsilon=1e-5),
             helper.make_node("Transpose", ["n"], ["tm"], perm=[2, 0, 1]),
             helper.make_node("GRU", ["tm", "W", "R", "B"], ["y", ""], name="gru", hidden_size=5,
                              linear_before_reset=1),
             helper.make_node("Squeeze", ["y", "axis1"], ["ys"]),
             helper.make_node("Transpose", ["ys"], ["out"], perm=[1, 0, 2])]
    graph = helper.make_graph(nodes, "torch_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["batch", "time", 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "steps", 5])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_pytorch_style_conv_front_end_imports(tmp_path):
    path = _pytorch_style_graph(tmp_path / "torch_like.onnx")
    spec = read_onnx(path)
    assert [(layer.kind, layer.name) for layer in spec.layers] == [
        ("conv1d", "conv1"), ("conv1d", "conv2"), ("batch_normalization", "norm"), ("gru", "gru")]
    assert spec.layers[0].config["padding"] == "same" and spec.layers[0].config["activation"] == "relu"
    assert spec.layers[1].config["groups"] == 2 and spec.layers[1].config["strides"] == 2
    x = random_input(2, 11, 3, seed=9)
    assert_close([Model(spec).predict(x)], onnxruntime_run(path, x), "engine vs onnxruntime")


def test_cli_exports_inspects_and_verifies_a_front_end_model(tmp_path, capsys):
    from gru_engine import cli

    layers, features = CASES["pool-3-s2"]
    model_path = tmp_path / "front.keras"
    build_model(layers, features, seed=1).save(model_path)
    bundle_path, onnx_path = tmp_path / "front.gru.safetensors", tmp_path / "front.onnx"
    assert cli.main(["export", str(model_path), "--bundle", str(bundle_path), "--onnx", str(onnx_path)]) == 0
    assert cli.main(["inspect", str(bundle_path)]) == 0
    assert cli.main(["verify", str(model_path), "--bundle", str(bundle_path), "--onnx", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    assert "(MaxPooling1D)" in printed and "[average_pooling1d] pool_size=3, strides=2" in printed
    assert "all agree within tolerance" in printed
