"""ONNX export: Keras vs onnxruntime on the native and tf2onnx graphs, and the round trip back to a bundle.

Parity runs through the benchmark registry (``Subject`` and the ``keras-call``, ``ort-native`` and
``ort-tf2onnx`` implementations), so the same code paths are compared here and benchmarked later.
Every comparison uses the project tolerance (``max_excess <= 0``), with batch and time lengths
unlike the (2, 7) self-check input; the ONNX graphs have dynamic batch and time.

GRUs with a tanh recurrent activation get at most 5 steps: z then lies in (-1, 1), the carry can
grow, and float32 rounding grows exponentially with it, so no two float32 implementations agree
over long sequences (see tests/test_parity.py's docstring for the measurements).

The whole parity matrix goes through tf2onnx too: converting all of it takes about 40 s on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import gru_engine
from gru_engine import BundleError, UnsupportedModelError
from gru_engine.bench.registry import IMPLEMENTATIONS, Subject
from gru_engine.exporters import export_onnx, import_onnx, read_onnx
from gru_engine.exporters.onnx_writer import build_onnx, output_names
from gru_engine.spec import Layer, ModelSpec, max_excess, recurrent_kind
from models import FAMILY_MATRIX, PARITY_MATRIX, build_model, random_input, uses_masking

FEATURES = 3
CHAOTIC_STEPS = 5
# (batch, time) pairs, none of them the self-check's (2, 7): several samples, and a single short one.
SHAPES = ((3, 11), (1, 2))
MATRIX = {**PARITY_MATRIX, **FAMILY_MATRIX}
MASKED = [name for name, layers in PARITY_MATRIX.items() if uses_masking(layers) is not None]
# LSTM, SimpleRNN and mixed chains: a subset covering each family's node mapping (gate order,
# hard_sigmoid's alpha, directions, states, merges), to keep the Keras models built here few.
FAMILY_NATIVE = ["lstm-activations-rec-hard_sigmoid", "lstm-bias-back", "lstm-return-state",
                 "lstm-return-state-sequences", "lstm-bidirectional-concat-sum", "lstm-bidirectional-mul-ave",
                 "lstm-bidirectional-none", "lstm-bidirectional-state", "simple_rnn-activations",
                 "simple_rnn-nobias-back", "simple_rnn-return-state", "simple_rnn-bidirectional-state",
                 "mixed-lstm-gru-dense", "mixed-bidirectional-lstm-simple_rnn", "mixed-simple_rnn-dense-lstm-gru"]
NATIVE = [name for name in PARITY_MATRIX if name not in MASKED] + FAMILY_NATIVE
TF2ONNX = list(PARITY_MATRIX) + ["lstm-masking", "mixed-lstm-gru-dense", "simple_rnn-return-state"]
ONNX_OPS = {"gru": "GRU", "lstm": "LSTM", "simple_rnn": "RNN"}
# The engine's known bug (see tests/test_parity.py): merge_mode=None outputs are sized for one direction.
def _inputs(name: str) -> list[np.ndarray]:
    layers = MATRIX[name]
    chaotic = any(layer.get("recurrent_activation") == "tanh" for layer in layers)
    return [random_input(batch, min(time, CHAOTIC_STEPS) if chaotic else time, FEATURES, seed=batch + time,
                         mask_value=uses_masking(layers)) for batch, time in SHAPES]


def _assert_parity(actual: list, expected: list, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}: output {index} has shape {a.shape}, expected {e.shape}"
        assert max_excess(a, e) <= 0, f"{what}: output {index} differs by up to {np.abs(a - e).max():.3g}"


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """One Subject per matrix entry, built once for the module."""
    cache = {}

    def get(name: str) -> Subject:
        if name not in cache:
            model = build_model(MATRIX[name], FEATURES, seed=list(MATRIX).index(name))
            cache[name] = Subject(model, name=name, workdir=tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def _compare(subject: Subject, implementation: str) -> None:
    keras = IMPLEMENTATIONS["keras-call"].prepare(subject, 1)
    run = IMPLEMENTATIONS[implementation].prepare(subject, 1)
    for x in _inputs(subject.name):
        _assert_parity(run(x), keras(x), f"{implementation} {subject.name} x{x.shape}")


@pytest.mark.parametrize("name", NATIVE)
def test_native_graph_matches_keras(subject, name):
    _compare(subject(name), "ort-native")


@pytest.mark.parametrize("name", NATIVE)
def test_native_graph_is_recurrent_nodes_and_checks(subject, name):
    model = onnx.load(str(subject(name).onnx_path("native")))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    recurrent = [ONNX_OPS[recurrent_kind(layer)] for layer in subject(name).spec.layers if layer.kind != "dense"]
    assert [op for op in ops if op in ONNX_OPS.values()] == recurrent, "one node of the layer's kind per layer"
    assert not {"Loop", "Scan", "If"} & set(ops)
    assert [value.name for value in model.graph.input] == ["input"]
    assert [value.name for value in model.graph.output] == output_names(subject(name).spec)


@pytest.mark.parametrize("name", MASKED)
def test_native_export_refuses_masking(subject, name, tmp_path):
    out = tmp_path / "masked.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(UnsupportedModelError, match="Masking.*method='tf2onnx'"):
        export_onnx(subject(name).keras_model, out)
    assert out.read_bytes() == b"previous", "a refused export must leave the old file alone"


@pytest.mark.parametrize("name", TF2ONNX)
def test_tf2onnx_graph_matches_keras(subject, name):
    _compare(subject(name), "ort-tf2onnx")
    session = ort.InferenceSession(str(subject(name).onnx_path("tf2onnx")), providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["input"]
    assert [value.name for value in session.get_outputs()] == output_names(subject(name).spec)
    assert not isinstance(session.get_inputs()[0].shape[0], int), "the batch axis must be dynamic"


def _same_layers(imported: list[Layer], original: list[Layer], names: bool = True) -> None:
    """Same kinds, names, configurations and weights; zero_output_for_mask (no masking in ONNX) aside."""
    def config(layer):
        strip = lambda c: {k: v for k, v in c.items() if k != "zero_output_for_mask"}  # noqa: E731
        if layer.kind == "bidirectional":
            return {**layer.config, "forward": strip(layer.config["forward"]),
                    "backward": strip(layer.config["backward"])}
        return strip(layer.config)
    assert [layer.kind for layer in imported] == [layer.kind for layer in original]
    if names:
        assert [layer.name for layer in imported] == [layer.name for layer in original]
    for mine, theirs in zip(imported, original):
        assert config(mine) == config(theirs), mine.name
        assert sorted(mine.weights) == sorted(theirs.weights), mine.name
        for key, array in theirs.weights.items():
            np.testing.assert_array_equal(mine.weights[key], array, err_msg=f"{mine.name}.{key}")


@pytest.mark.parametrize("name", NATIVE)
def test_round_trip_recovers_the_spec(subject, name, tmp_path):
    spec = read_onnx(subject(name).onnx_path("native"))
    _same_layers(spec.layers, subject(name).spec.layers)
    assert spec.source["framework"] == "onnx"


@pytest.mark.parametrize("name", NATIVE)
def test_round_trip_engine_matches_keras(subject, name, tmp_path):
    path = import_onnx(subject(name).onnx_path("native"), tmp_path / "imported.gru.safetensors")
    model = gru_engine.load(path)  # replays the onnxruntime self-check
    keras = IMPLEMENTATIONS["keras-call"].prepare(subject(name), 1)
    for x in _inputs(name):
        outputs = model.predict(x)
        _assert_parity(outputs if isinstance(outputs, list) else [outputs], keras(x), f"round trip {name}")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["airline", "return-state-sequences", "dense-tanh",
                                  "reset_after-False-bias-True-back-False", "lstm-return-state-sequences",
                                  "mixed-simple_rnn-dense-lstm-gru"])
def test_state_io_streams_in_chunks(subject, name, tmp_path):
    """state_io: feeding state_<k> back as initial_state_<k> continues the sequence exactly."""
    subject = subject(name)
    session = _session(export_onnx(subject.spec, tmp_path / "state.onnx", state_io=True))
    state_shapes = gru_engine.Model(subject.spec).state_shapes
    assert [(i.name, i.shape[1]) for i in session.get_inputs()[1:]] == [
        (f"initial_state_{k}", units) for k, units in enumerate(state_shapes)]
    x = _inputs(name)[0]
    expected = IMPLEMENTATIONS["keras-call"].prepare(subject, 1)(x)[0]
    names = [output.name for output in session.get_outputs()]
    states = {f"initial_state_{k}": np.zeros((x.shape[0], units), np.float32) for k, units in enumerate(state_shapes)}
    chunks = []
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:]):
        results = dict(zip(names, session.run(None, {"input": chunk, **states})))
        states = {f"initial_state_{k}": results[f"state_{k}"] for k in range(len(state_shapes))}
        chunks.append(results["output"])
    streamed = np.concatenate(chunks, axis=1) if expected.ndim == 3 else chunks[-1]
    _assert_parity([streamed], [expected], f"state_io {name}")


@pytest.mark.parametrize("name", ["bidirectional-concat", "reset_after-True-bias-True-back-True",
                                  "lstm-bidirectional-concat-sum", "mixed-bidirectional-lstm-simple_rnn"])
def test_state_io_initial_states_match_the_engine(subject, name, tmp_path):
    """initial_state_<k> is the engine's initial_state[k] (one per carry, in layer order)."""
    spec = subject(name).spec
    session = _session(export_onnx(spec, tmp_path / "state.onnx", state_io=True))
    engine = gru_engine.Model(spec)
    x = _inputs(name)[0]
    rng = np.random.default_rng(5)
    states = [rng.normal(0, 0.5, (x.shape[0], units)).astype(np.float32) for units in engine.state_shapes]
    results = session.run(None, {"input": x, **{f"initial_state_{k}": s for k, s in enumerate(states)}})
    _assert_parity(results[:1], [engine.predict(x, initial_state=states)], f"initial states {name}")


@pytest.mark.parametrize("name", ["return-state", "bidirectional-state", "lstm-return-state",
                                  "lstm-bidirectional-state", "simple_rnn-return-state"])
def test_state_io_graph_imports_with_initial_state(subject, name, tmp_path):
    """A state_io graph of one recurrent layer reads back: its initial_state_<k> inputs are the engine's."""
    path = export_onnx(subject(name).spec, tmp_path / "state.onnx", state_io=True)
    model = gru_engine.load(import_onnx(path, tmp_path / "state.gru.safetensors"))
    x = _inputs(name)[0]
    rng = np.random.default_rng(6)
    states = [rng.normal(0, 0.5, (x.shape[0], units)).astype(np.float32) for units in model.state_shapes]
    expected = _session(path).run(None, {"input": x, **{f"initial_state_{k}": s for k, s in enumerate(states)}})
    _assert_parity(model.predict(x, initial_state=states), expected, f"state_io import {name}")


def _spec_with_unequal_directions() -> ModelSpec:
    """A Bidirectional whose directions differ in units and reset_after: two ONNX GRU nodes, not one."""
    rng = np.random.default_rng(3)

    def gru(units, reset_after, go_backwards):
        return {"units": units, "activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True,
                "reset_after": reset_after, "return_sequences": True, "return_state": False,
                "go_backwards": go_backwards, "zero_output_for_mask": True, "stateful": False}

    def weights(units, reset_after, inputs):
        return {"kernel": rng.normal(0, 0.5, (inputs, 3 * units)).astype(np.float32),
                "recurrent_kernel": rng.normal(0, 0.5, (units, 3 * units)).astype(np.float32),
                "bias": rng.normal(0, 0.5, (2, 3 * units) if reset_after else (3 * units,)).astype(np.float32)}
    config = {"merge_mode": "concat", "forward": gru(3, True, False), "backward": gru(5, False, True)}
    tensors = {f"forward.{k}": v for k, v in weights(3, True, FEATURES).items()}
    tensors.update({f"backward.{k}": v for k, v in weights(5, False, FEATURES).items()})
    return ModelSpec(FEATURES, [Layer("bidirectional", "unequal", config, tensors)])


def test_bidirectional_with_unequal_directions_round_trips(tmp_path):
    """The engine (parity-tested against Keras elsewhere) is the oracle for a spec Keras rarely makes."""
    spec = _spec_with_unequal_directions()
    path = export_onnx(spec, tmp_path / "unequal.onnx")
    assert [node.op_type for node in onnx.load(str(path)).graph.node].count("GRU") == 2
    x = random_input(4, 9, FEATURES)
    _assert_parity(_session(path).run(None, {"input": x}), [gru_engine.Model(spec).predict(x)], "unequal")
    _same_layers(read_onnx(path).layers, spec.layers, names=False)  # one node per direction


def test_export_from_a_bundle_without_tensorflow(subject, tmp_path):
    """A bundle is enough to write ONNX: the exporter must not touch TensorFlow, Keras or tf2onnx."""
    airline = subject("airline")
    out = tmp_path / "from-bundle.onnx"
    code = ("import sys\n"
            "for name in ('tensorflow', 'keras', 'tf2onnx'):\n"
            "    sys.modules[name] = None  # any import of them now fails\n"
            "from gru_engine.exporters import export_onnx\n"
            "export_onnx(sys.argv[1], sys.argv[2], opset=18)\n")
    result = subprocess.run([sys.executable, "-c", code, str(airline.bundle_path), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    keras = IMPLEMENTATIONS["keras-call"].prepare(airline, 1)
    for x in _inputs("airline"):
        _assert_parity(_session(out).run(None, {"input": x}), keras(x), "export from bundle")


def test_export_from_a_keras_file_and_a_spec_agree(subject, tmp_path):
    airline = subject("airline")
    keras_file = tmp_path / "airline.keras"
    airline.keras_model.save(keras_file)
    from_file = onnx.load(str(export_onnx(keras_file, tmp_path / "file.onnx")))
    from_spec = build_onnx(airline.spec)
    assert from_file.graph == from_spec.graph


@pytest.mark.parametrize("opset", [13, 21])
def test_other_opsets(subject, opset, tmp_path):
    ave = subject("bidirectional-ave")
    path = export_onnx(ave.spec, tmp_path / f"opset{opset}.onnx", opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    keras = IMPLEMENTATIONS["keras-call"].prepare(ave, 1)
    for x in _inputs("bidirectional-ave"):
        _assert_parity(_session(path).run(None, {"input": x}), keras(x), f"opset {opset}")


def test_bad_arguments_are_refused_clearly(subject, tmp_path):
    airline = subject("airline")
    with pytest.raises(ValueError, match="method 'onnx' is unknown"):
        export_onnx(airline.spec, tmp_path / "x.onnx", method="onnx")
    with pytest.raises(ValueError, match="opset 12 is not supported"):
        export_onnx(airline.spec, tmp_path / "x.onnx", opset=12)
    with pytest.raises(ValueError, match="bundle has none"):
        export_onnx(airline.bundle_path, tmp_path / "x.onnx", method="tf2onnx")
    with pytest.raises(ValueError, match="state_io=True needs method='native'"):
        export_onnx(airline.keras_model, tmp_path / "x.onnx", method="tf2onnx", state_io=True)
    with pytest.raises(BundleError, match="no such file"):
        export_onnx(tmp_path / "missing.gru.safetensors", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_tf2onnx_refuses_stateful_models(tmp_path):
    model = build_model([{"kind": "gru", "units": 3, "stateful": True}], FEATURES, batch=2)
    with pytest.raises(UnsupportedModelError, match="stateful"):
        export_onnx(model, tmp_path / "stateful.onnx", method="tf2onnx")


def test_imported_bundle_describes_its_source(subject, tmp_path):
    path = import_onnx(subject("units-1").onnx_path("native"), tmp_path / "units1.gru.safetensors")
    spec = gru_engine.load(path).spec
    assert spec.source["framework"] == "onnx" and spec.source["producer"].startswith("gru-engine")
    assert spec.self_check_input.shape[:2] == (2, 7)


def test_bundle_and_spec_exports_are_identical(subject):
    """A spec read back from its bundle writes the same graph (no information lost on the way)."""
    dense = subject("dense-softmax")
    assert build_onnx(gru_engine.bundle.read(dense.bundle_path)).graph == build_onnx(dense.spec).graph

