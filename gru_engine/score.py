"""``gru-engine score``: a whole data set through a model on Dask, resumable, with nothing lost.

The input is cut into chunks of rows. Each chunk is one Dask task chain: read its rows, run the
model (``gru_engine.dask.predict``), write its output atomically (temp file, then rename), then
record it as done. Everything is staged in a hidden directory next to the output,
``.OUT.partial/``:

    manifest.json      the job: the input's identity, the bundle's sha256, chunking, output kind
    done/<index>.json  one record per finished chunk, written after its output
    data/              the output under construction

A rerun of the same command (same manifest) computes only the chunks without a record; another
input, bundle or chunking starts over. A worker killed mid-job loses nothing: its tasks run again
elsewhere and rewrite the same part under the same name, so no row is lost or duplicated. The
output appears under its final name only when every chunk is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets
from . import dask as gru_dask
from .errors import InputError
from .fileio import atomic_write_bytes

MANIFEST_FORMAT = "gru-engine-score/1"
# Default chunk: about this much input, and at least a few chunks per worker to balance the load.
CHUNK_INPUT_BYTES = 32 << 20
CHUNKS_PER_WORKER = 4


@dataclasses.dataclass
class ScoreResult:
    output: Path
    rows: int
    seconds: float       # reading, scoring and writing, once the workers are up and the graph is built
    startup_s: float     # imports, loading the model, starting or reaching the cluster, building the graph
    workers: int
    chunks: int
    computed: int  # chunks computed by this run; the others were done by an earlier, interrupted one

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        skipped = self.chunks - self.computed
        resumed = f", {skipped} of {self.chunks} chunks already done" if skipped else ""
        return (f"scored {self.rows:,} rows in {self.seconds:.2f} s: {rate:,.0f} rows/s on {self.workers} "
                f"worker{'s' if self.workers != 1 else ''} (after {self.startup_s:.1f} s of start-up){resumed}; "
                f"wrote {self.output}")


def staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def default_rows_per_chunk(source, workers: int) -> int:
    rows, steps, features = source.shape
    by_bytes = max(1, CHUNK_INPUT_BYTES // (steps * features * 4))
    rows_per_chunk = max(1, min(by_bytes, -(-rows // (CHUNKS_PER_WORKER * max(1, workers)))))
    if source.chunk_rows:  # whole stored chunks per task: no stored chunk is read twice
        rows_per_chunk = -(-rows_per_chunk // source.chunk_rows) * source.chunk_rows
    return rows_per_chunk


def _positive(value, what: str):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return value


# ----- the task chain of one chunk (runs on the workers) ------------------------------------------------


def read_block(source, block_info=None) -> np.ndarray:
    start, stop = block_info[None]["array-location"][0]
    return source.read(start, stop)


def write_block(y: np.ndarray, sink: datasets.Sink, source, done: str, block_info=None) -> np.ndarray:
    """Write one chunk's output, then its record; returns its row count (a (1,) array)."""
    index = block_info[0]["chunk-location"][0]
    start, stop = block_info[0]["array-location"][0]
    sink.write(index, start, y, source)
    record = json.dumps({"index": index, "start": start, "stop": stop}).encode()
    atomic_write_bytes(Path(done) / f"{index:06d}.json", record)
    return np.array([stop - start], np.int64)


# ----- the job (runs on the client) ---------------------------------------------------------------------


def _manifest(source, sha256: str, rows_per_chunk: int, sink: datasets.Sink) -> dict:
    return {"format": MANIFEST_FORMAT, "input": datasets.identity(Path(source.path)), "input_kind": source.kind,
            "shape": list(source.shape), "bundle_sha256": sha256, "rows_per_chunk": rows_per_chunk,
            "output_kind": sink.kind, "row_shape": list(sink.row_shape), "keep_columns": sink.keep}


def finished_chunks(staging: Path, chunks: list[tuple[int, int]]) -> set[int]:
    """Indices of the chunks with a record of exactly their rows."""
    done = set()
    for index, (start, stop) in enumerate(chunks):
        try:
            record = json.loads((staging / "done" / f"{index:06d}.json").read_text())
        except (OSError, ValueError):
            continue
        if record == {"index": index, "start": start, "stop": stop}:
            done.add(index)
    return done


def _resume(staging: Path, manifest: dict, chunks: list[tuple[int, int]], log) -> set[int]:
    """The chunks an earlier run of this same job finished; a staging area of another job is cleared."""
    path = staging / "manifest.json"
    if staging.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == manifest:
            return finished_chunks(staging, chunks)
        log(f"{staging}: left by a run on another input, model or chunking; starting over")
        shutil.rmtree(staging)
    (staging / "done").mkdir(parents=True)
    atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
    return set()


@contextlib.contextmanager
def open_scheduler(scheduler: str | None, workers: int | None, model):
    """Yield (client or None, workers): a new local cluster, an existing one (tcp://...) or in-process."""
    if scheduler == "synchronous":
        if workers is not None:
            raise InputError("--workers sizes a local cluster; --scheduler synchronous runs in this process")
        yield None, 1
        return
    gru_dask.require("distributed")
    from distributed import Client, LocalCluster
    if scheduler:
        if workers is not None:
            raise InputError("--workers sizes a local cluster; an existing cluster keeps its own workers")
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler} ({datasets.first_line(exc)})") from None
        with client:
            yield client, len(client.nthreads())
        return
    import logging
    workers = workers or gru_dask.usable_cores()
    # Before any worker starts, so they load the kernels they run from Numba's cache instead of compiling them.
    gru_dask.warm(model, (gru_dask.numba_threads_per_task(gru_dask.usable_cores(), workers),))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client, workers


def _run(pending: list, client, progress: bool) -> None:
    """Compute the chunk tasks; on failure or Ctrl-C, cancel the rest (finished chunks stay recorded)."""
    if client is None:
        import dask
        bar = contextlib.nullcontext()
        if progress:
            from dask.diagnostics import ProgressBar
            bar = ProgressBar()
        with bar:
            dask.compute(*pending, scheduler="synchronous")
        return
    from distributed import progress as progress_bar
    futures = client.compute(pending)
    try:
        if progress:
            progress_bar(futures)
        client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def score(bundle, input, output, *, scheduler: str | None = None, workers: int | None = None,
          rows_per_chunk: int | None = None, batch: int | None = None, overwrite: bool = False,
          shape=None, column: str | None = None, keep_columns: bool = False, progress: bool = False,
          log=None) -> ScoreResult:
    """Score every row of ``input`` with the bundle into ``output``; see the module docstring."""
    started = time.perf_counter()
    log = log or (lambda line: print(line, file=sys.stderr))
    _positive(workers, "--workers")
    _positive(rows_per_chunk, "--rows-per-chunk")
    _positive(batch, "--batch")
    output = Path(output)
    kind = datasets.output_kind(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it")
    source = datasets.open_source(input, shape, column)
    if output.resolve().is_relative_to(Path(source.path).resolve()):
        raise InputError(f"{output} is inside the input {input}; write the output elsewhere, so the input stays "
                         "the same from run to run")
    if keep_columns and not (source.kind == "parquet" and kind == "parquet"):
        raise InputError("--keep-columns copies Parquet columns; it needs Parquet input and output")
    model, path, _, sha256 = gru_dask.ship(bundle)
    rows, steps, features = source.shape
    if features != model.input_features:
        raise InputError(f"{input}: {features} features per time step; this model takes {model.input_features}")
    staging = staging_path(output)
    keep = source.other_columns if keep_columns else []
    if datasets.OUTPUT_COLUMN in keep:
        raise InputError(f"{input}: has a column '{datasets.OUTPUT_COLUMN}', which the output column would "
                         "replace; rename it")
    with open_scheduler(scheduler, workers, model) as (client, count):
        rows_per_chunk = rows_per_chunk or default_rows_per_chunk(source, count)
        bounds = list(range(0, rows, rows_per_chunk)) + [rows]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        sink = datasets.Sink(kind, str(staging / "data"), rows, gru_dask.row_shape(model, steps), rows_per_chunk, keep)
        done = _resume(staging, _manifest(source, sha256, rows_per_chunk, sink), chunks, log)
        sink.prepare()
        pending = _graph(source, path, model, sink, staging, rows_per_chunk, batch, done, len(chunks))
        scoring = time.perf_counter()
        if pending:
            _run(pending, client, progress)
    missing = len(chunks) - len(finished_chunks(staging, chunks))
    if missing:
        raise RuntimeError(f"{missing} chunk(s) have no record after the job; rerun the same command to finish them")
    sink.publish(output, len(chunks), overwrite)
    shutil.rmtree(staging)
    return ScoreResult(output, rows, time.perf_counter() - scoring, scoring - started, count, len(chunks),
                       len(pending))


def input_array(source, rows_per_chunk: int):
    """The source as a dask array (batch, time, features), one block of ``rows_per_chunk`` rows per task,
    each read on the worker that runs it."""
    import dask
    import dask.array as da
    rows, steps, features = source.shape
    chunks = (tuple(min(rows_per_chunk, rows - start) for start in range(0, rows, rows_per_chunk)), (steps,),
              (features,))
    name = "gru-engine-read-" + dask.base.tokenize(datasets.identity(Path(source.path)), chunks)
    return da.map_blocks(read_block, source, chunks=chunks, dtype=np.float32, name=name,
                         meta=np.empty((0, 0, 0), np.float32))


def _graph(source, path, model, sink, staging: Path, rows_per_chunk: int, batch, done: set[int], count: int):
    """One delayed task chain per chunk not yet done: read, predict, write, record."""
    y = gru_dask.predict(path or model, input_array(source, rows_per_chunk), batch=batch or gru_dask.DEFAULT_BATCH)
    written = y.map_blocks(write_block, sink, source, str(staging / "done"), chunks=((1,) * count,),
                           drop_axis=list(range(1, y.ndim)), dtype=np.int64, meta=np.empty((0,), np.int64))
    blocks = written.to_delayed().ravel()
    return [blocks[index] for index in range(count) if index not in done]
