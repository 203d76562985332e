"""Scoring on Dask against a real cluster: two worker processes of one thread, shared by the module.

Every output is compared with ``Model.predict`` on the whole array; the resume test kills a real
``gru-engine score`` process mid-job, the worker test kills a real worker process.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zarr = pytest.importorskip("zarr")

import gru_engine  # noqa: E402
import gru_engine.dask as gru_dask  # noqa: E402
from gru_engine import BundleError, InputError, Model, bundle, cli  # noqa: E402
from gru_engine.datasets import SHAPE_KEY  # noqa: E402
from gru_engine.score import score, staging_path  # noqa: E402
from gru_engine.spec import Layer  # noqa: E402
from reference import gru_config, random_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMAND = Path(sys.executable).parent / "gru-engine"
STEPS, FEATURES = 6, 3


def scoring_spec(seed=2, sequences=False):
    layers = [Layer("gru", "first", gru_config(12, return_sequences=True)),
              Layer("gru", "second", gru_config(8, return_sequences=sequences)),
              Layer("dense", "out", {"units": 2, "activation": "linear", "use_bias": True})]
    return random_spec(layers, FEATURES, seed=seed)


def windows(rows, seed=0, steps=STEPS):
    return np.random.default_rng(seed).standard_normal((rows, steps, FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster
    import logging
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as local, Client(local) as client:
        yield client


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    path = bundle.save(scoring_spec(), tmp_path_factory.mktemp("bundle") / "model.gru.safetensors")
    gru_dask.warm(gru_engine.load(path))  # compiled before the workers need it, as the CLI does
    return path


@pytest.fixture(scope="module")
def model(bundle_path):
    return gru_engine.load(bundle_path)


def parquet_file(path, x, row_group_size=None, metadata=True, first_id=0):
    values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1] * x.shape[2])
    table = pa.table({"id": (first_id + np.arange(len(x))) * 10, "seq": values})
    if metadata:
        table = table.replace_schema_metadata({SHAPE_KEY: json.dumps(list(x.shape[1:])).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_input(kind, directory, x):
    if kind == "npy":
        path = directory / "x.npy"
        np.save(path, x)
    elif kind == "zarr":
        path = directory / "x.zarr"
        zarr.create_array(str(path), shape=x.shape, chunks=(100, STEPS, FEATURES), dtype="float32")[:] = x
    else:
        path = directory / "x.parquet"
        path.mkdir()
        parquet_file(path / "a.parquet", x[:450], row_group_size=200)
        parquet_file(path / "b.parquet", x[450:], row_group_size=200, first_id=450)
    return path


def read_output(path):
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".zarr":
        return zarr.open_array(str(path), mode="r")[:]
    table = pq.read_table(path)
    shape = json.loads(table.schema.metadata[SHAPE_KEY])
    return np.stack(table.column("output").to_numpy(zero_copy_only=False)).reshape(-1, *shape)


def address(cluster):
    return cluster.scheduler.address


# ----- pickling and the Python API --------------------------------------------------------------------


def test_a_model_pickles_as_its_bundle_bytes_and_is_checked_when_unpickled(model, bundle_path):
    data = pickle.dumps(model)
    # The weights travel in the pickle (the receiving process may not see the file), once.
    assert len(data) < 1.2 * bundle_path.stat().st_size
    x = windows(50)
    assert np.array_equal(pickle.loads(data).predict(x), model.predict(x))
    # A pickle whose weights changed on the way is refused by the self-check.
    weights = model.spec.layers[0].weights["kernel"].tobytes()
    tampered = data.replace(weights[:64], (np.frombuffer(weights[:64], np.float32) * 3).tobytes())
    assert tampered != data
    with pytest.raises(BundleError, match="self-check failed"):
        pickle.loads(tampered)


def test_without_dask_the_error_names_the_extra(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "dask.array", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=re.escape("gru-engine[dask]")):
        gru_dask.predict(model, windows(4))


def test_predict_equals_model_predict_and_loads_the_bundle_once_per_worker(cluster, bundle_path, model):
    x = windows(1000)
    y = gru_dask.predict(bundle_path, da.from_array(x, chunks=(100, -1, -1)))
    assert y.shape == (1000, 2) and y.chunks[0] == (100,) * 10
    assert np.array_equal(y.compute(), model.predict(x))
    sha = gru_dask.ship(bundle_path)[3]
    loads = [report[sha] for report in cluster.run(gru_dask.loaded_models).values()]
    # Ten tasks, two workers: each worker process loaded it from the path, once, and reused it.
    assert loads == [{"origin": "path", "loads": 1}] * 2


def test_a_model_without_a_path_is_sent_as_bytes_once_per_worker(cluster):
    spec = scoring_spec(seed=7, sequences=True)
    spec.self_check_input, spec.self_check_outputs = None, []  # built in code: a self-check is made for it
    model = Model(spec)
    x = windows(600, seed=3)
    y = gru_dask.predict(model, da.from_array(x, chunks=(50, -1, -1)), batch=16)
    assert y.shape == (600, STEPS, 2)
    assert np.array_equal(y.compute(), model.predict(x))
    sha = gru_dask.ship(model)[3]
    loads = [report[sha] for report in cluster.run(gru_dask.loaded_models).values() if sha in report]
    assert loads and all(entry == {"origin": "bytes", "loads": 1} for entry in loads)
    # The bytes are one key of the graph, not a copy in every task.
    graph = dict(y.__dask_graph__())
    assert sum(isinstance(value, bytes) for value in graph.values()) <= 1


def test_numba_gets_the_cores_left_per_dask_thread(cluster, bundle_path):
    assert [gru_dask.numba_threads_per_task(8, threads) for threads in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    plan, visible = gru_dask.cluster_plan(cluster, str(bundle_path), gru_dask.ship(bundle_path)[3])
    assert visible
    assert [threads for _, threads in plan] == [gru_dask.numba_threads_per_task(gru_dask.usable_cores(), 2)]


def test_predict_refuses_arrays_it_cannot_score(model):
    x = da.from_array(windows(20), chunks=(10, 3, -1))
    with pytest.raises(InputError, match=re.escape("rechunk({1: -1, 2: -1})")):
        gru_dask.predict(model, x)
    with pytest.raises(InputError, match="this model takes 3"):
        gru_dask.predict(model, da.zeros((10, STEPS, 4), chunks=(5, -1, -1)))
    with pytest.raises(InputError, match="numeric"):
        gru_dask.predict(model, da.from_array(np.full((4, STEPS, FEATURES), "a"), chunks=(2, -1, -1)))
    with pytest.raises(InputError, match="rows 10..19: 1 input sequence"):
        bad = windows(20)
        bad[15, 2, 1] = np.nan
        gru_dask.predict(model, da.from_array(bad, chunks=(10, -1, -1))).compute(scheduler="synchronous")


# ----- gru-engine score --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npy", "zarr", "parquet"])
def test_score_equals_model_predict_for_each_format(kind, cluster, bundle_path, model, tmp_path):
    x = windows(900, seed=4)
    source = write_input(kind, tmp_path, x)
    output = tmp_path / f"y.{kind}"
    result = score(bundle_path, source, output, scheduler=address(cluster), rows_per_chunk=200, batch=64,
                   keep_columns=kind == "parquet")
    assert (result.rows, result.chunks, result.computed, result.workers) == (900, 5, 5, 2)
    assert np.array_equal(read_output(output), model.predict(x))
    assert not staging_path(output).exists()
    if kind == "parquet":
        assert pq.read_table(output).column("id").to_pylist() == list(range(0, 9000, 10))


def test_score_command_in_process_prints_one_summary_line(bundle_path, model, tmp_path, capsys):
    x = windows(300, seed=5)
    np.save(tmp_path / "x.npy", x)
    status = cli.main(["score", str(bundle_path), "--input", str(tmp_path / "x.npy"), "--output",
                       str(tmp_path / "y.npy"), "--scheduler", "synchronous", "--rows-per-chunk", "128"])
    assert status == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"scored 300 rows in [\d.]+ s: [\d,]+ rows/s on 1 worker .*wrote .*y\.npy", line), line
    assert np.array_equal(np.load(tmp_path / "y.npy"), model.predict(x))


def test_an_interrupted_job_resumes_computing_only_the_missing_chunks(cluster, bundle_path, model, tmp_path):
    x = windows(12000, seed=6, steps=40)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "y.npy"
    args = [str(COMMAND), "score", str(bundle_path), "--input", str(tmp_path / "x.npy"), "--output", str(output),
            "--scheduler", address(cluster), "--rows-per-chunk", "200"]
    done = staging_path(output) / "done"
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (done.is_dir() and len(list(done.glob("*.json"))) >= 2) and time.monotonic() < deadline:
            assert job.poll() is None, job.communicate()
            time.sleep(0.005)
    finally:
        job.send_signal(signal.SIGKILL)  # the client dies without any chance to tidy up
        job.wait()
    assert not output.exists()
    time.sleep(1.0)  # tasks the workers had already started finish and record themselves
    before = {path.name: path.stat().st_mtime_ns for path in done.glob("*.json")}
    assert 2 <= len(before) < 60, "the job finished before it could be interrupted"
    from distributed import get_task_stream
    with get_task_stream(cluster) as stream:
        result = score(bundle_path, tmp_path / "x.npy", output, scheduler=address(cluster), rows_per_chunk=200)
    predicted = [task for task in stream.data if "gru-engine-predict" in str(task["key"])]
    assert result.chunks == 60 and len(predicted) == result.computed <= 60 - len(before)
    assert np.array_equal(np.load(output), model.predict(x))


def test_a_worker_killed_mid_job_loses_and_duplicates_nothing(cluster, bundle_path, model, tmp_path):
    x = windows(16000, seed=8, steps=40)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "y.npy"
    done = staging_path(output) / "done"
    pids = cluster.run(os.getpid)
    killed = {}

    def kill_one_worker_after_the_first_chunk():
        deadline = time.monotonic() + 120
        while not (done.is_dir() and any(done.glob("*.json"))) and time.monotonic() < deadline:
            time.sleep(0.005)
        killed["chunks done"] = len(list(done.glob("*.json")))
        os.kill(next(iter(pids.values())), signal.SIGKILL)

    killer = threading.Thread(target=kill_one_worker_after_the_first_chunk)
    killer.start()
    result = score(bundle_path, tmp_path / "x.npy", output, scheduler=address(cluster), rows_per_chunk=200)
    killer.join()
    assert 1 <= killed["chunks done"] < 80, killed
    assert result.computed == result.chunks == 80
    assert np.array_equal(np.load(output), model.predict(x))
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarts it; later tests get two workers again


# ----- bad input: a clear error and nothing under the output's name ----------------------------------


def _refused(bundle_path, source, output, match, **options):
    with pytest.raises(InputError, match=match):
        score(bundle_path, source, output, scheduler=options.pop("scheduler", "synchronous"), **options)
    assert not output.exists()


def test_inputs_of_the_wrong_shape_dtype_or_width_are_refused(bundle_path, tmp_path):
    np.save(tmp_path / "flat.npy", windows(10)[:, :, 0])
    _refused(bundle_path, tmp_path / "flat.npy", tmp_path / "a.npy", r"shape \(10, 6\).*\(batch, time, features\)")
    np.save(tmp_path / "text.npy", np.full((4, STEPS, FEATURES), "x"))
    _refused(bundle_path, tmp_path / "text.npy", tmp_path / "b.zarr", "holds <U1; a numeric array is needed")
    np.save(tmp_path / "wide.npy", np.zeros((4, STEPS, 5), np.float32))
    _refused(bundle_path, tmp_path / "wide.npy", tmp_path / "c.npy", "5 features per time step; this model takes 3")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    _refused(bundle_path, tmp_path / "junk.npy", tmp_path / "d.npy", "not a readable numeric .npy file")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    _refused(bundle_path, tmp_path / "junk.parquet", tmp_path / "e.parquet", "not a readable Parquet file")
    _refused(bundle_path, tmp_path / "missing.npy", tmp_path / "f.npy", "no such file")
    _refused(bundle_path, tmp_path / "wide.npy", tmp_path / "g.csv", "end the name in .npy, .zarr or .parquet")


def test_parquet_rows_of_the_wrong_length_are_refused(cluster, bundle_path, tmp_path):
    x = windows(40)
    parquet_file(tmp_path / "fixed.parquet", x, metadata=False)
    _refused(bundle_path, tmp_path / "fixed.parquet", tmp_path / "a.parquet", "no per-row shape")
    _refused(bundle_path, tmp_path / "fixed.parquet", tmp_path / "a.parquet", "lists of 18 values.*= 21",
             shape=[7, 3])
    rows = [list(row.ravel()) for row in x]
    rows[33] = rows[33][:-1]  # plain lists: one row is short, found when its chunk is read
    table = pa.table({"seq": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(table.replace_schema_metadata({SHAPE_KEY: b"[6, 3]"}), tmp_path / "ragged.parquet")
    _refused(bundle_path, tmp_path / "ragged.parquet", tmp_path / "b.parquet", "row 33 of column 'seq' holds 17 values",
             scheduler=address(cluster), rows_per_chunk=10)


def test_an_existing_output_is_kept_unless_overwrite(bundle_path, model, tmp_path):
    x = windows(30)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "y.parquet"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        score(bundle_path, tmp_path / "x.npy", output, scheduler="synchronous")
    assert (output / "mine.txt").read_text() == "keep me"
    score(bundle_path, tmp_path / "x.npy", output, scheduler="synchronous", overwrite=True)
    assert np.array_equal(read_output(output), model.predict(x))


def test_the_readme_dask_snippet_runs(bundle_path, model, tmp_path, monkeypatch):
    import dask
    section = (ROOT / "README.md").read_text().split("## Scoring large data sets", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    x = windows(500, seed=9)
    zarr.create_array(str(tmp_path / "windows.zarr"), shape=x.shape, chunks=(128, STEPS, FEATURES),
                      dtype="float32")[:] = x
    (tmp_path / "model.gru.safetensors").write_bytes(bundle_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    with dask.config.set(scheduler="threads"):
        exec(compile(snippet, "README.md", "exec"), {})
    assert np.array_equal(zarr.open_array(str(tmp_path / "scores.zarr"), mode="r")[:], model.predict(x))
