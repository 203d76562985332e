"""Every file the project writes goes through fileio.atomic_write: a failure at any point leaves the
previous file under that name intact and no temporary file behind."""

import os

import numpy as np
import pytest

from gru_engine import bundle, fileio
from gru_engine.spec import Layer
from reference import gru_config, random_spec

PREVIOUS = b"the previous file, which must survive"


@pytest.fixture(scope="module")
def spec():
    return random_spec([Layer("gru", "gru", gru_config(3, return_sequences=True)),
                        Layer("dense", "dense", {"units": 2, "activation": "linear", "use_bias": True})],
                       2, seed=4)


def write_onnx(spec, path):
    from gru_engine.exporters import export_onnx
    return export_onnx(spec, path)


def write_report(spec, path):
    from gru_engine.bench.report import write_json
    return write_json({"machine": {}, "configs": []}, path)


def write_chart(spec, path):
    from gru_engine.bench.report import write_chart
    timing = {"status": "ok", "median_s": 2e-6, "p10_s": 1e-6, "p90_s": 3e-6}
    config = {"name": "tiny", "threads": 1, "implementations": {"engine": timing}}
    return write_chart({"machine": {"cpu": "test", "cores": 1}, "configs": [config]}, path)


WRITERS = {
    "bundle.gru.safetensors": bundle.save,
    "model.onnx": write_onnx,
    "y.npy": lambda spec, path: fileio.save_array(path, np.ones((2, 3), np.float32)),
    "y.csv": lambda spec, path: fileio.save_array(path, np.ones((2, 3), np.float32)),
    "report.json": write_report,
    "chart.png": write_chart,
}


def leftovers(directory, name):
    return sorted(entry for entry in os.listdir(directory) if entry != name)


@pytest.mark.parametrize("name", WRITERS)
def test_a_write_that_fails_at_the_rename_keeps_the_previous_file(tmp_path, monkeypatch, spec, name):
    target = tmp_path / name
    target.write_bytes(PREVIOUS)

    def failing_replace(source, destination):
        assert os.path.getsize(source) > 0  # the new file was complete when the rename failed
        raise OSError("injected: disk full at rename")
    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        WRITERS[name](spec, target)
    assert target.read_bytes() == PREVIOUS
    assert leftovers(tmp_path, name) == []


@pytest.mark.parametrize("interruption", [OSError("injected: device error"), KeyboardInterrupt()])
def test_a_writer_killed_half_way_leaves_the_previous_file(tmp_path, interruption):
    target = tmp_path / "out.bin"
    target.write_bytes(PREVIOUS)

    def half_then_die(temp):
        with open(temp, "wb") as handle:
            handle.write(b"half of the new")
        raise interruption
    with pytest.raises(type(interruption)):
        fileio.atomic_write(target, half_then_die)
    assert target.read_bytes() == PREVIOUS
    assert leftovers(tmp_path, "out.bin") == []


@pytest.mark.parametrize("name", WRITERS)
def test_a_successful_write_replaces_the_file(tmp_path, spec, name):
    target = tmp_path / name
    target.write_bytes(PREVIOUS)
    WRITERS[name](spec, target)
    assert target.read_bytes() != PREVIOUS and target.stat().st_size > 0
    assert leftovers(tmp_path, name) == []
