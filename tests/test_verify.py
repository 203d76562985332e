"""``gru-engine verify``: real Keras models, real bundles and ONNX graphs, compared on random inputs."""

from types import SimpleNamespace

import numpy as np
import pytest
from models import build_model

from gru_engine import bundle
from gru_engine.cli import main as cli_main
from gru_engine.errors import InputError
from gru_engine.exporters import read_keras
from gru_engine.exporters.verify import DRAWS, compare, random_inputs, verify
from gru_engine.spec import PARITY_ATOL, PARITY_RTOL

SMALL = [{"kind": "gru", "units": 6, "return_sequences": True}, {"kind": "gru", "units": 4},
         {"kind": "dense", "units": 2}]
MASKED = [{"kind": "masking", "mask_value": 0.0}, {"kind": "gru", "units": 5}]
STATEFUL = [{"kind": "gru", "units": 4, "stateful": True, "return_sequences": True}]


def _save(model, folder, name, transforms=()):
    """The model as .keras and as a bundle (optionally with input/output transforms)."""
    model_path = folder / f"{name}.keras"
    model.save(model_path)
    spec = read_keras(model)
    spec.transforms = list(transforms)
    return model_path, bundle.save(spec, folder / f"{name}.gru.safetensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    small = build_model(SMALL, features=3, seed=0)
    model, small_bundle = _save(small, folder, "small")
    _, other_bundle = _save(build_model(SMALL, features=3, seed=1), folder, "other")
    _, narrow_bundle = _save(build_model(SMALL, features=2, seed=0), folder, "narrow")
    scaled = [{"kind": "affine", "scale": [2.0, 3.0, 4.0], "offset": [1.0, 0.0, -1.0],
               "output_scale": [5.0, 6.0], "output_offset": [0.5, -0.5]}]
    _, scaled_bundle = _save(small, folder, "scaled", scaled)
    return SimpleNamespace(folder=folder, keras=small, model=model, bundle=small_bundle, other=other_bundle,
                           narrow=narrow_bundle, scaled=scaled_bundle)


def test_the_models_own_bundle_agrees(saved, capsys):
    assert verify(saved.model, bundle_path=saved.bundle) == 0
    out = capsys.readouterr().out
    assert f"engine ({saved.bundle}) vs keras: largest difference" in out
    assert "(ok)" in out and "all agree within tolerance" in out


def test_without_a_bundle_the_engine_runs_the_model_in_memory(saved, capsys):
    assert verify(saved.model) == 0
    assert "engine (in memory) vs keras" in capsys.readouterr().out


def test_another_models_bundle_is_reported_and_fails(saved, capsys):
    assert verify(saved.model, bundle_path=saved.other) == 1
    out = capsys.readouterr().out
    assert "BEYOND tolerance" in out and "FAILED: 1 of 1 disagree" in out


def test_a_bundle_with_other_features_is_a_clear_error(saved):
    with pytest.raises(InputError, match="takes 2 features per step, the Keras model 3"):
        verify(saved.model, bundle_path=saved.narrow)


def test_bundle_transforms_are_skipped_keras_knows_nothing_of_them(saved, capsys):
    assert verify(saved.model, bundle_path=saved.scaled) == 0, capsys.readouterr().out


def test_onnx_graphs_agree_and_another_models_graph_fails(saved, capsys):
    from gru_engine.exporters import export_onnx

    onnx_paths = {method: export_onnx(saved.keras, saved.folder / f"small.{method}.onnx", method=method)
                  for method in ("native", "tf2onnx")}
    other = export_onnx(build_model(SMALL, features=3, seed=1), saved.folder / "other.onnx")
    for path in onnx_paths.values():
        assert verify(saved.model, bundle_path=saved.bundle, onnx_path=path) == 0
        assert f"onnxruntime ({path}) vs keras: largest difference" in capsys.readouterr().out
    assert verify(saved.model, onnx_path=other) == 1
    out = capsys.readouterr().out
    assert "engine (in memory) vs keras" in out and "FAILED: 1 of 2 disagree" in out


def test_the_command_exits_non_zero_only_beyond_tolerance(saved, capsys):
    assert cli_main(["verify", str(saved.model), "--bundle", str(saved.bundle)]) == 0
    assert cli_main(["verify", str(saved.model), "--bundle", str(saved.other)]) == 1
    assert cli_main(["verify", str(saved.folder / "missing.keras")]) == 1
    assert "missing.keras: no such Keras model file" in capsys.readouterr().err


def test_masked_models_get_padded_inputs_and_agree(tmp_path, capsys):
    keras_model = build_model(MASKED, features=2, seed=0)
    inputs = random_inputs(keras_model, read_keras(keras_model))
    assert [x.shape[:2] for x in inputs] == list(DRAWS)
    assert all((x == 0.0).all(axis=2).any() for x in inputs)  # whole padded steps, which Masking skips
    model_path, bundle_path = _save(keras_model, tmp_path, "masked")
    assert verify(model_path, bundle_path=bundle_path) == 0, capsys.readouterr().out


def test_a_fixed_batch_and_length_are_honoured(tmp_path, capsys):
    keras_model = build_model(STATEFUL, features=2, seed=0, steps=5, batch=3)
    inputs = random_inputs(keras_model, read_keras(keras_model))
    assert {x.shape for x in inputs} == {(3, 5, 2)}
    model_path, bundle_path = _save(keras_model, tmp_path, "stateful")
    assert verify(model_path, bundle_path=bundle_path) == 0, capsys.readouterr().out


def test_compare_applies_the_parity_tolerance_and_refuses_mismatched_outputs():
    expected = np.float32([[100.0, -2.0]])
    tolerance = PARITY_ATOL + PARITY_RTOL * 100.0
    within = compare(expected + np.float32([[0.5 * tolerance, 0.0]]), expected)
    beyond = compare(expected + np.float32([[2.0 * tolerance, 0.0]]), expected)
    assert within.ok and within.largest == pytest.approx(0.5 * tolerance, rel=1e-2)
    assert not beyond.ok and beyond.excess == pytest.approx(tolerance, rel=1e-2)
    assert not compare(expected[:, :1], expected).ok
    assert "shape (1, 1), the reference (1, 2)" in compare(expected[:, :1], expected).describe()
    assert "2 outputs, the reference has 1" in compare([expected, expected], [expected]).describe()


def test_lstm_and_simple_rnn_models_verify_and_inspect(tmp_path, capsys):
    from gru_engine.exporters import export_onnx

    layers = [{"kind": "lstm", "units": 6, "return_sequences": True},
              {"kind": "simple_rnn", "units": 4, "return_sequences": True},
              {"kind": "bidirectional", "layer": "lstm", "units": 3}, {"kind": "dense", "units": 2}]
    keras_model = build_model(layers, features=3, seed=0)
    model_path, bundle_path = _save(keras_model, tmp_path, "families")
    onnx_path = export_onnx(keras_model, tmp_path / "families.onnx")
    assert verify(model_path, bundle_path=bundle_path, onnx_path=onnx_path) == 0, capsys.readouterr().out
    capsys.readouterr()
    assert cli_main(["inspect", str(bundle_path)]) == 0
    out = capsys.readouterr().out
    for layer in keras_model.layers:
        assert f"{layer.name} ({type(layer).__name__})" in out
        assert f"{layer.count_params():,}" in out
