"""The ``gru-engine`` command end to end in fresh processes, its one-line errors, and the built wheel.

Subprocesses are few: only ``export`` imports TensorFlow (seconds); the other verbs start in about a
second. Error cases that need no process boundary run ``cli.main`` in-process.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gru_engine import InputError, cli
from gru_engine.fileio import read_array
from gru_engine.spec import max_excess
from models import AIRLINE, build_model, random_input

ROOT = Path(__file__).resolve().parent.parent
COMMAND = Path(sys.executable).parent / "gru-engine"


def run(*args, cwd, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          input=stdin, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The airline forecaster saved by Keras, exported by the CLI in a fresh process."""
    workdir = tmp_path_factory.mktemp("cli")
    keras_model = build_model(AIRLINE, 1, seed=5)
    keras_model.save(workdir / "airline.keras")
    result = run("export", "airline.keras", "--bundle", "airline.gru.safetensors", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "airline.gru.safetensors" in result.stdout
    return workdir, keras_model


def test_export_predict_inspect_round_trip(exported):
    workdir, keras_model = exported
    x = random_input(6, 10, 1, seed=9)  # (6, 10, 1)
    np.save(workdir / "x.npy", x)
    result = run("predict", "airline.gru.safetensors", "--input", "x.npy", "--output", "y.npy", cwd=workdir)
    assert result.returncode == 0, result.stderr
    expected = np.asarray(keras_model(x))  # (6, 1)
    y = np.load(workdir / "y.npy")
    assert y.shape == expected.shape and max_excess(y, expected) <= 0

    # A CSV is one sequence (time, features), with an optional header; output printed as CSV.
    (workdir / "x.csv").write_text("passengers\n" + "\n".join(f"{v:.9g}" for v in x[0, :, 0]) + "\n")
    result = run("predict", "airline.gru.safetensors", "--input", "x.csv", cwd=workdir)
    assert result.returncode == 0, result.stderr
    printed = np.loadtxt(result.stdout.splitlines(), delimiter=",", ndmin=2)
    assert max_excess(printed, expected[:1]) <= 0

    # --stream: one output per row as it arrives; the last is the prediction for the whole window.
    result = run("predict", "airline.gru.safetensors", "--stream", "--input", "-", cwd=workdir,
                 stdin=(workdir / "x.csv").read_text())
    assert result.returncode == 0, result.stderr
    streamed = np.loadtxt(result.stdout.splitlines(), delimiter=",", ndmin=2)
    assert streamed.shape == (10, 1) and max_excess(streamed[-1:], expected[:1]) <= 0
    assert max_excess(streamed[3:4], np.asarray(keras_model(x[:1, :4]))) <= 0

    result = run("inspect", "airline.gru.safetensors", cwd=workdir)
    assert result.returncode == 0, result.stderr
    for layer in keras_model.layers:
        assert layer.name in result.stdout
    assert f"{keras_model.count_params():,}" in result.stdout


def test_errors_in_a_fresh_process_are_one_line(exported, tmp_path):
    workdir, _ = exported
    assert_one_line_error(run("predict", "absent.gru.safetensors", "--input", "x.npy", cwd=tmp_path),
                          "absent.gru.safetensors", "no such file")
    (tmp_path / "noise.gru.safetensors").write_bytes(np.random.default_rng(0).bytes(1000))
    assert_one_line_error(run("inspect", "noise.gru.safetensors", cwd=tmp_path), "noise.gru.safetensors")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 10, 3), np.float32))
    assert_one_line_error(run("predict", workdir / "airline.gru.safetensors", "--input", "wrong.npy",
                              cwd=tmp_path), "3 features", "takes 1")


@pytest.fixture()
def bundle_path(exported):
    return exported[0] / "airline.gru.safetensors"


def main_error(capsys, *argv) -> str:
    """Run the CLI in-process; it must fail with exactly one line on stderr and return the line."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert status != 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_npy_inputs_that_are_refused(capsys, tmp_path, bundle_path):
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "object arrays are refused" in main_error(capsys, "predict", bundle_path, "--input", objects)

    pickled = tmp_path / "pickled.npy"  # a pickle in disguise: loading it must not unpickle
    pickled.write_bytes(pickle.dumps({"payload": [1, 2, 3]}))
    assert "pickled.npy" in main_error(capsys, "predict", bundle_path, "--input", pickled)

    structured = tmp_path / "structured.npy"
    np.save(structured, np.zeros((2, 10, 1), dtype=[("a", "<f4")]))
    assert "numeric" in main_error(capsys, "predict", bundle_path, "--input", structured)

    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([[["1"]]]))
    assert "numeric" in main_error(capsys, "predict", bundle_path, "--input", strings)

    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((2, 10, 1), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    assert "truncated.npy" in main_error(capsys, "predict", bundle_path, "--input", truncated)


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000000,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 10, 1\xd6 }",
])
def test_npy_headers_that_lie_are_refused(tmp_path, header):
    text = header.encode("latin-1").decode("unicode_escape").encode("latin-1")
    padded = text + b" " * (63 - (10 + len(text)) % 64) + b"\n"
    path = tmp_path / "lying.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(padded)) + padded + bytes(80))
    with pytest.raises(InputError, match="lying.npy"):
        read_array(path)


@pytest.mark.parametrize("text, message", [
    ("", "no data rows"),
    ("value\n", "no data rows"),
    ("1\n2\nthree\n", "line 3"),
    ("1,2\n3\n", "different numbers of columns"),
    ("1\nnan\n", "NaN or infinite"),
    ("1,2\n3,4\n", "2 features"),
])
def test_csv_inputs_that_are_refused(capsys, tmp_path, bundle_path, text, message):
    path = tmp_path / "x.csv"
    path.write_text(text)
    assert message in main_error(capsys, "predict", bundle_path, "--input", path)


def test_other_usage_errors(capsys, tmp_path, bundle_path):
    assert "unknown input type" in main_error(capsys, "predict", bundle_path, "--input", bundle_path)
    assert "no such file" in main_error(capsys, "predict", bundle_path, "--input", tmp_path / "absent.npy")
    assert "--input" in main_error(capsys, "predict", bundle_path)
    assert "directory" in main_error(capsys, "inspect", tmp_path)
    assert "no such Keras model file" in main_error(capsys, "export", tmp_path / "absent.keras", "--bundle",
                                                   tmp_path / "out.gru.safetensors")
    assert not (tmp_path / "out.gru.safetensors").exists()


def test_export_refuses_an_unsupported_model_in_one_line(capsys, tmp_path):
    import keras
    model = keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(3, return_sequences=True),
                              keras.layers.LayerNormalization(name="my_norm")])
    model.save(tmp_path / "norm.keras")
    line = main_error(capsys, "export", tmp_path / "norm.keras", "--bundle", tmp_path / "out.gru.safetensors")
    assert "'my_norm'" in line and "LayerNormalization" in line
    assert not (tmp_path / "out.gru.safetensors").exists()


def _copy_sources(destination: Path) -> None:
    """What a source distribution holds: pyproject.toml, its readme and every package directory."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    destination.mkdir()
    shutil.copy(ROOT / "pyproject.toml", destination)
    readme = project["project"].get("readme")
    if readme:
        shutil.copy(ROOT / readme, destination)
    for directory in set(project["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / directory, destination / directory,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_the_wheel_installs_gru_engine_exporters(tmp_path):
    """Build a wheel from a copy of the sources, unpack it, and import from it alone: the editable
    install of this checkout must not be what answers."""
    sources = tmp_path / "src"
    _copy_sources(sources)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(sources)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gru_engine-*.whl")
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)

    script = (
        "import gru_engine, gru_engine.exporters, gru_engine.bench.registry, gru_engine.cli\n"
        "from gru_engine.exporters import export_bundle, read_keras\n"
        "from importlib.resources import files\n"
        "print(gru_engine.__file__)\n"
        "print(gru_engine.exporters.__file__)\n"
        "print(gru_engine.bench.registry.__file__)\n"
        "print(files('gru_engine').joinpath('data/airline-passengers.csv').is_file())\n"
    )
    # -S: no site-packages processing, so the editable install's path hook is never installed;
    # numpy and numba come from site-packages on PYTHONPATH, gru_engine only from the wheel.
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=elsewhere,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    *paths, has_data = result.stdout.split()
    for path in paths:
        assert Path(path).is_relative_to(installed), f"{path} is not from the wheel"
    assert has_data == "True"
