"""``gru-engine demo``: the pieces on the real data set, then the whole command, run as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gru_engine import demo, demo_data, transforms
from reference import apply_transforms, invert_transforms

EXPECTED_FILES = {
    "forecast.png", "latency.png", "comparison.png", "report.json", "last-window.csv",
    *(f"{name}{suffix}" for name in ("tutorial", "level", "level-lstm")
      for suffix in (".keras", ".gru.safetensors", ".native.onnx", ".tf2onnx.onnx")),
}


@pytest.fixture(scope="module")
def windows():
    return demo_data.make_windows(*demo_data.load_series())


def _month(windows, index):
    return str(windows.target_months[index])


def test_windows_hold_out_the_last_fifth_and_say_which_months(windows):
    assert len(windows.series) == 144 and len(windows.x) == 134 and windows.split == 107
    assert np.array_equal(windows.x[5], windows.series[5:15]) and windows.y[5] == windows.series[15]
    assert (_month(windows, 0), _month(windows, windows.split - 1)) == ("1949-11", "1958-09")
    assert (_month(windows, windows.split), _month(windows, -1)) == ("1958-10", "1960-12")
    assert str(windows.months[windows.training_months][-1]) == "1958-09"


def test_the_min_max_scaler_sees_only_the_training_months(windows):
    approach = demo_data.tutorial_approach(windows)
    fitted = approach.encode(None, windows.series[windows.training_months])
    assert fitted.min() == 0.0 and fitted.max() == pytest.approx(1.0)
    # Why the tutorial model falls short: the held-out peaks lie above anything it was trained on.
    assert approach.encode(None, windows.y[windows.held_out]).max() > 1.2


@pytest.mark.parametrize("make", [demo_data.tutorial_approach, lambda windows: demo_data.level_approach()],
                         ids=["tutorial", "level"])
def test_declared_transforms_do_what_the_python_encoding_does(windows, make):
    approach = make(windows)
    transforms.validate(approach.transforms, input_features=1, output_dim=1)
    x = windows.x[..., None]  # (N, WINDOW, 1) passengers
    network_x, context = apply_transforms(approach.transforms, x)
    np.testing.assert_allclose(network_x[..., 0], approach.encode(windows.x, windows.x), rtol=1e-6, atol=1e-6)
    network_y = np.random.default_rng(0).uniform(-0.5, 1.5, (len(x), 1)).astype(np.float32)  # (N, 1)
    np.testing.assert_allclose(invert_transforms(approach.transforms, network_y, context),
                               approach.decode(windows.x, network_y), rtol=1e-6)


def test_baselines_repeat_last_year_and_last_month(windows):
    predictions = demo_data.baselines(windows)
    target = demo_data.WINDOW + windows.split  # series index of the first held-out month
    assert predictions["seasonal-naive"][windows.split] == windows.series[target - 12]
    assert predictions["last-value"][windows.split] == windows.series[target - 1]


def test_score_in_the_units_given():
    figures = demo_data.score(np.array([110.0, 180.0]), np.array([100.0, 200.0]))
    assert figures["rmse"] == pytest.approx(np.sqrt((100 + 400) / 2))
    assert figures["mape"] == pytest.approx(10.0)


def test_bad_options_are_refused_with_a_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--epochs", "0"])
    assert exit_info.value.code == 2 and "'0' is not a whole number >= 1" in capsys.readouterr().err
    occupied = tmp_path / "file"
    occupied.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        demo.main(["--out", str(occupied)])


def _gru_engine(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gru_engine.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = _gru_engine("demo", "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, json.loads((out / "report.json").read_text())


def test_demo_writes_every_file(demo_run):
    out, stdout, report = demo_run
    assert set(report["files"]) == EXPECTED_FILES and report["skipped"] == {}
    for name in EXPECTED_FILES:
        assert (out / name).stat().st_size > 0, name
        assert name in stdout  # the summary names each file
    assert not [path.name for path in out.iterdir() if path.name not in EXPECTED_FILES]  # no temp files left


def test_demo_parity_is_within_tolerance_everywhere(demo_run):
    _, stdout, report = demo_run
    assert report["parity_ok"]
    for name, model in report["models"].items():
        assert set(model["parity"]) == {"engine", "onnxruntime-native", "onnxruntime-tf2onnx", "engine-passengers"}
        for implementation, difference in model["parity"].items():
            assert difference["ok"] and difference["excess"] <= 0 and np.isfinite(difference["largest"]), \
                (name, implementation)


def test_demo_scores_every_forecast_on_the_same_held_out_months(demo_run):
    _, stdout, report = demo_run
    assert report["split"]["held_out_targets"] == ["1958-10", "1960-12"]
    assert "27 held-out months 1958-10 .. 1960-12" in stdout
    naive = report["baselines"]["seasonal-naive"]["rmse"]
    for name, model in report["models"].items():
        assert model["beats_seasonal_naive"] == (model["held_out"]["rmse"] < naive)
        verdict = "beats" if model["beats_seasonal_naive"] else "does NOT beat"
        assert f"the {name} model {verdict} seasonal-naive" in stdout
        assert f"{name:<16}{model['held_out']['rmse']:>8.1f}{model['held_out']['mape']:>9.1f}" in stdout


def test_demo_pngs_are_images(demo_run):
    import matplotlib.image

    out, _, _ = demo_run
    for name in ("forecast.png", "latency.png", "comparison.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05  # something is drawn


def test_the_demo_bundle_takes_and_returns_passengers(demo_run):
    out, _, report = demo_run
    result = _gru_engine("predict", str(out / "level.gru.safetensors"), "--input", str(out / "last-window.csv"))
    assert result.returncode == 0, result.stderr
    forecast = float(result.stdout)
    assert forecast == pytest.approx(report["models"]["level"]["forecast_after_last_window"], rel=1e-6)
    assert 300 < forecast < 700  # passengers (thousands), not a scaled value


def test_demo_compares_gru_and_lstm_and_gives_a_verdict(demo_run):
    out, stdout, report = demo_run
    comparison = report["gru_vs_lstm"]
    gru, lstm = comparison["models"]["level"], comparison["models"]["level-lstm"]
    assert report["models"]["level-lstm"]["layers"] == "LSTM" and report["models"]["level"]["layers"] == "GRU"
    # GRU(50) -> GRU(50) -> Dense(1) against the same with LSTM layers, counted as Keras counts them.
    assert (gru["parameters"], lstm["parameters"]) == (23_301, 30_651)
    for model, name in ((gru, "level"), (lstm, "level-lstm")):
        assert model["held_out_rmse"] == report["models"][name]["held_out"]["rmse"]
        assert model["training_seconds"] == report["models"][name]["training"]["seconds"] > 0
        assert all(seconds > 0 for seconds in model["latency_s"].values()), model["latency_s"]
    assert comparison["seasonal_naive_rmse"] == report["baselines"]["seasonal-naive"]["rmse"]
    assert comparison["verdict"] in stdout and "24% fewer parameters" in comparison["verdict"]
    assert ("HOLDS" in comparison["verdict"]) != ("does NOT hold" in comparison["verdict"])


@pytest.mark.parametrize("times, expected", [
    ((20e-6, 30e-6, 5e-6, 7e-6), '"GRU is cheaper than LSTM" HOLDS on this run'),
    ((20e-6, 21e-6, 5e-6, 7e-6), "HOLDS in parameters and in part in time"),
    ((20e-6, 21e-6, 5e-6, 5.2e-6), "HOLDS in parameters only (the run times are the same within noise)"),
    ((20e-6, 15e-6, 5e-6, 7e-6), "does NOT hold"),
    (None, "HOLDS in parameters only on this run"),
])
def test_the_verdict_weighs_time_beyond_noise(times, expected):
    from gru_engine import demo_compare

    def model(parameters, window, step):
        latency = None if times is None else {"engine per window": window, "engine per step": step}
        return {"parameters": parameters, "training_seconds": 1.0, "held_out_rmse": 30.0, "latency_s": latency}
    window_gru, window_lstm, step_gru, step_lstm = times or (None,) * 4
    data = {"models": {"gru": model(3, window_gru, step_gru), "lstm": model(4, window_lstm, step_lstm)},
            "seasonal_naive_rmse": 40.0}
    text = demo_compare.verdict(data, "gru", "lstm")
    assert expected in text and "25% fewer parameters" in text


def test_two_runs_with_one_seed_agree_and_no_lstm_skips_the_comparison(demo_run, tmp_path):
    out, _, report = demo_run
    again = _gru_engine("demo", "--epochs", "2", "--out", str(tmp_path), "--no-bench", "--no-lstm")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "report.json").read_text())
    assert second["gru_vs_lstm"] is None and second["skipped"]["gru-vs-lstm"] == "--no-lstm was given"
    assert set(second["models"]) == {"tutorial", "level"} and not (tmp_path / "comparison.png").exists()
    for name in second["models"]:
        assert second["models"][name]["held_out"] == report["models"][name]["held_out"]
        assert (tmp_path / f"{name}.gru.safetensors").read_bytes() == (out / f"{name}.gru.safetensors").read_bytes()
