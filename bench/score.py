"""The ``score`` benchmark: 200,000 airline windows scored three ways on this machine.

- ``Model.predict`` in one process on the whole in-memory array (one Numba thread, and every core);
- ``gru_engine.dask.predict`` on a local cluster of one worker, then of two (one thread each), the
  windows read from a .npy file by the workers, the outputs gathered to the client.

Each way is timed ``REPEATS`` times (median); clusters are started before the clock starts and
their start-up is reported apart, with the first chunk's latency on fresh workers (which load the
kernels from Numba's cache, warmed here first) and, in a full run, on a worker whose Numba cache is
empty. The cluster overhead per chunk is the worker time beyond one-thread ``Model.predict``:
(workers x median - predict on 1 thread) / chunks.

Runs in its own process (``python -m gru_engine.bench.score OUT.json [--quick]``), spawned by the runner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .machine import all_cores, thread_environment
from .units import format_rate, format_seconds
from .workloads import AIRLINE_STEPS, airline_recipe

SCORE = "score"
ROWS = 200_000
ROWS_PER_CHUNK = 25_000
REPEATS = {True: 3, False: 7}  # by quick
WORKER_COUNTS = (1, 2)


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter_ns()
    result = call()
    return (time.perf_counter_ns() - start) / 1e9, result


def _median(call, repeats: int, reference) -> float:
    times = []
    for _ in range(repeats):
        seconds, result = _timed(call)
        if not np.array_equal(result, reference):
            raise RuntimeError("a Dask run's output differs from Model.predict's")
        times.append(seconds)
    return float(np.median(times))


@contextlib.contextmanager
def _environment(**variables):
    """Variables set in this process while workers are spawned. LocalCluster's ``env`` would set them
    too late: a spawned worker re-imports this module, and with it Numba, before applying ``env``."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_chunk(bundle_path, source, workers: int, **environment) -> tuple[float, float]:
    """(cluster start-up s, first chunk s) on a fresh local cluster whose workers get ``environment``."""
    from distributed import Client, LocalCluster

    import gru_engine.dask as gru_dask
    from gru_engine.score import input_array
    started = time.perf_counter()
    with _environment(**environment), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster):
        startup = time.perf_counter() - started
        first, _ = _timed(lambda: gru_dask.predict(bundle_path, input_array(source, ROWS_PER_CHUNK)[:ROWS_PER_CHUNK])
                          .compute())
    return startup, first


def measure(quick: bool, workdir: Path) -> dict:
    import numba
    from distributed import Client, LocalCluster

    import gru_engine
    import gru_engine.dask as gru_dask
    from gru_engine.datasets import NpySource
    from gru_engine.score import input_array

    from .registry import Subject

    repeats = REPEATS[quick]
    bundle_path = Subject(airline_recipe().build(), name="airline", workdir=workdir).bundle_path
    x = np.random.default_rng(3).standard_normal((ROWS, AIRLINE_STEPS, 1)).astype(np.float32)  # (B, T, 1)
    np.save(workdir / "windows.npy", x)
    source = NpySource.open(workdir / "windows.npy")
    model = gru_engine.load(bundle_path)
    gru_dask.warm(model)
    reference = model.predict(x)
    chunks = -(-ROWS // ROWS_PER_CHUNK)
    ways = {}
    cores = all_cores()
    for threads in sorted({1, cores}):
        numba.set_num_threads(threads)
        ways[f"predict-{threads}t"] = {"what": f"Model.predict, one process, {threads} Numba thread(s)",
                                       "median_s": _median(lambda: model.predict(x), repeats, reference)}
    numba.set_num_threads(cores)
    for workers in WORKER_COUNTS:
        startup, first = _first_chunk(bundle_path, source, workers)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster):
            array = input_array(source, ROWS_PER_CHUNK)
            gru_dask.predict(bundle_path, array[:ROWS_PER_CHUNK]).compute()  # workers load the model first
            median = _median(lambda: gru_dask.predict(bundle_path, array).compute(), repeats, reference)
        overhead = (workers * median - ways["predict-1t"]["median_s"]) / chunks
        ways[f"dask-{workers}w"] = {"what": f"gru_engine.dask.predict, {workers} worker process(es) x 1 thread",
                                    "median_s": median, "cluster_start_s": startup, "first_chunk_s": first,
                                    "overhead_per_chunk_s": overhead}
    for entry in ways.values():
        entry["rows_per_s"] = ROWS / entry["median_s"]
    result = {"rows": ROWS, "steps": AIRLINE_STEPS, "rows_per_chunk": ROWS_PER_CHUNK, "chunks": chunks,
              "repeats": repeats, "ways": ways, "cold_first_chunk_s": None}
    if not quick:  # compiling takes minutes on a busy machine
        with tempfile.TemporaryDirectory(prefix="numba-cold-") as empty:
            result["cold_first_chunk_s"] = _first_chunk(bundle_path, source, 1, NUMBA_CACHE_DIR=empty)[1]
    return result


def run(quick: bool, directory: Path) -> dict:
    """``measure`` in a fresh process with every core (it builds the model with Keras)."""
    out = directory / "score.json"
    command = [sys.executable, "-m", "gru_engine.bench.score", str(out)] + (["--quick"] if quick else [])
    finished = subprocess.run(command, env=thread_environment(all_cores()), stdout=2)
    if finished.returncode != 0 or not out.is_file():
        return {"note": f"the score benchmark failed (exit {finished.returncode}); its messages are above"}
    return json.loads(out.read_text())


def format_lines(score: dict) -> list[str]:
    if "ways" not in score:
        return [f"score: {score.get('note', 'not measured')}"]
    lines = [f"score: {score['rows']:,} airline windows (T={score['steps']}), {score['chunks']} chunks of "
             f"{score['rows_per_chunk']:,} rows, median of {score['repeats']}"]
    for name, entry in score["ways"].items():
        line = (f"  {name:<12} {format_seconds(entry['median_s']):>9} {format_rate(entry['rows_per_s'], 'row'):>14}"
                f"  {entry['what']}")
        if "overhead_per_chunk_s" in entry:
            line += (f"; overhead {format_seconds(max(entry['overhead_per_chunk_s'], 0.0))}/chunk, cluster start "
                     f"{format_seconds(entry['cluster_start_s'])}, first chunk {format_seconds(entry['first_chunk_s'])}")
        lines.append(line)
    if score.get("cold_first_chunk_s") is not None:
        lines.append(f"  first chunk on a worker with an empty Numba cache (compiling): "
                     f"{format_seconds(score['cold_first_chunk_s'])}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from gru_engine.fileio import atomic_write_bytes
    with tempfile.TemporaryDirectory(prefix="gru-engine-score-") as directory:
        result = measure("--quick" in argv, Path(directory))
    atomic_write_bytes(argv[0], json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
