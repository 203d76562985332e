"""Scoring on Dask: ``predict(model_or_path, array)`` maps a model over the blocks of a dask array.

    import dask.array as da
    import gru_engine.dask
    x = da.from_zarr("windows.zarr")                               # (batch, time, features)
    y = gru_engine.dask.predict("model.gru.safetensors", x)        # lazy, (batch, D) or (batch, time, D)
    y.to_zarr("scores.zarr")

How the model travels. Every task carries a small ticket: the bundle's sha256 and, when given a
path, that path. A worker process loads the model on its first task and keeps it, keyed by sha256,
for every later task: from the path when the file there has that sha256, otherwise from the
bundle's bytes. The bytes are one key of the graph, which tasks depend on, so Dask sends them to a
worker once, not once per task; they are only in the graph when needed (a Model rather than a
path, or a cluster where some worker cannot read the path). The first load validates the bundle
and replays its self-check; a Model without a stored self-check gets one computed here first.

The JIT cache. Numba compiles the kernels once per machine and caches them on disk (entries are
written to a temp file and renamed, so a reader never sees half of one). ``warm`` fills it with
the kernels tasks run. ``predict`` warms this process for Dask's local schedulers; with a
distributed client it warms one worker per host before returning, so a host's workers never
compile at the same time (``gru-engine score`` also warms before it starts a local cluster).

Threads. Dask already runs one task per worker thread, so Numba gets, per task, the host's cores
divided by the Dask threads on that host (at least 1): ``numba_threads_per_task``. Numba's
workqueue threading layer aborts when two threads launch parallel kernels at once; with one Numba
thread per task (the usual case: Dask's threads fill the cores) no parallel kernel runs at all.

This module imports Dask (the ``dask`` extra) when called, never when ``gru_engine`` is imported.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import mmap
import os
import sys
import threading
from pathlib import Path

import numpy as np

from . import bundle
from .errors import BundleError, InputError
from .program import PARALLEL_MIN_BATCH
from .runtime import ACCEPTED_KINDS, Model
from .spec import output_shapes, sample_input

EXTRA_HINT = "pip install 'gru-engine[dask]'"
# Rows per Model.predict call inside a block: bounds a call's scratch and output memory.
DEFAULT_BATCH = 65536
# Models kept per worker process (most jobs use one).
CACHED_MODELS = 4


def require(module: str = "dask.array"):
    """Import ``module`` or raise an ImportError naming the extra that provides it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed ({exc}); scoring on Dask needs the dask extra: "
                          f"{EXTRA_HINT}") from None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def numba_threads_per_task(cores: int, dask_threads: int) -> int:
    """The rule: each Dask thread runs one task, so a task's kernels get an equal share of the cores."""
    return max(1, cores // max(1, dask_threads))


@dataclasses.dataclass(frozen=True)
class Ticket:
    """What every task carries to find its model: small, so it costs nothing per task."""

    sha256: str
    path: str | None
    row_shape: tuple[int, ...]                  # one output row: (D,) or (time, D)
    batch: int
    threads: tuple[tuple[str, int], ...] = ()   # (host, Numba threads per task) on a distributed cluster


# ----- on the workers ---------------------------------------------------------------------------------

_MODELS: collections.OrderedDict[str, Model] = collections.OrderedDict()
_ORIGINS: dict[str, dict] = {}  # sha256 -> {"origin": "path" | "bytes", "loads": n}, for inspection
_LOCK = threading.Lock()


def _sha256(buffer) -> str:
    return hashlib.sha256(buffer).hexdigest()


def _load_from_path(path: str, sha256: str) -> Model | None:
    """The model at ``path`` if that file is readable here and has this sha256 (validated, self-checked)."""
    try:
        with open(path, "rb") as handle:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # missing, unreadable, empty
        return None
    if _sha256(buffer) != sha256:
        return None
    model = Model(bundle.from_buffer(buffer, path))
    bundle.self_check(model, path)
    return model


def worker_model(ticket: Ticket, data: bytes | None = None) -> Model:
    """This process's copy of the ticket's model, loaded, validated and self-checked on first use."""
    with _LOCK:
        model = _MODELS.get(ticket.sha256)
        if model is not None:
            _MODELS.move_to_end(ticket.sha256)
            return model
        model = _load_from_path(ticket.path, ticket.sha256) if ticket.path else None
        origin = "path"
        if model is None:
            if data is None:
                raise BundleError(f"{ticket.path}: not readable on this worker, or not the bundle the job was "
                                  "started with (its sha256 differs); put the bundle on storage every worker sees, "
                                  "or pass the loaded Model to gru_engine.dask.predict so its bytes are sent")
            if _sha256(data) != ticket.sha256:
                raise BundleError("the bundle bytes received differ from those sent (sha256 mismatch)")
            from . import loads
            model, origin = loads(data, verify=True), "bytes"
        _MODELS[ticket.sha256] = model
        if len(_MODELS) > CACHED_MODELS:
            _MODELS.popitem(last=False)
        entry = _ORIGINS.setdefault(ticket.sha256, {"origin": origin, "loads": 0})
        entry.update(origin=origin, loads=entry["loads"] + 1)
        return model


def loaded_models() -> dict[str, dict]:
    """sha256 -> how this process loaded that model ("path" or "bytes") and how many times."""
    with _LOCK:
        return {sha: dict(entry) for sha, entry in _ORIGINS.items()}


def _task_threads(ticket: Ticket) -> int | None:
    """Numba threads for a task running here, by the rule above; None: leave Numba's setting alone."""
    if threading.current_thread() is threading.main_thread():
        return None  # the synchronous scheduler: one task at a time, all cores
    if "distributed" in sys.modules:
        from distributed import get_worker
        from distributed.comm import get_address_host
        try:
            host = get_address_host(get_worker().address)
        except ValueError:  # a thread of a local scheduler, not a distributed worker
            return 1
        return dict(ticket.threads).get(host, 1)
    return 1  # a local thread pool already has one thread per core


def _set_numba_threads(count: int | None) -> None:
    if count is not None:
        import numba
        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))  # per thread, so set per task


def main_output(outputs) -> np.ndarray:
    """Model.predict's first output: the one a score writes (a list for models with return_state)."""
    return outputs[0] if isinstance(outputs, list) else outputs


def predict_rows(model: Model, x: np.ndarray, batch: int, row_shape) -> np.ndarray:
    """Model.predict's main output for x (n, T, F), ``batch`` rows per call."""
    out = np.empty((x.shape[0], *row_shape), np.float32)  # (n, D) or (n, T, D)
    for start in range(0, x.shape[0], batch):
        out[start:start + batch] = main_output(model.predict(x[start:start + batch]))
    return out


def predict_block(x: np.ndarray, ticket: Ticket, data: bytes | None = None, block_info=None) -> np.ndarray:
    """One block (n, T, F) -> (n, *row_shape): the task map_blocks runs."""
    model = worker_model(ticket, data)
    _set_numba_threads(_task_threads(ticket))
    if not x.flags.writeable:
        x = np.array(x)  # read-only arrays are another kernel signature, which warm() did not compile
    try:
        return predict_rows(model, x, ticket.batch, ticket.row_shape)
    except InputError as exc:
        where = block_info[0]["array-location"][0] if block_info else None
        raise InputError(f"rows {where[0]}..{where[1] - 1}: {exc}" if where else str(exc)) from None


# ----- on the client ----------------------------------------------------------------------------------


def _with_self_check(model: Model) -> Model:
    """``model``, or a copy carrying a self-check computed here, so workers can check what they load."""
    spec = model.spec
    if spec.self_check_input is not None:
        return model
    x = sample_input(spec, 2, 8, np.random.default_rng(0))  # (2, 8, F)
    if any(step["kind"] == "log" for step in spec.transforms):
        x = np.abs(x) + np.float32(0.5)
    outputs = model.predict_raw(x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return Model(dataclasses.replace(spec, self_check_input=x, self_check_outputs=list(outputs)))


def ship(model_or_path) -> tuple[Model, str | None, bytes, str]:
    """(model, path or None, the bundle's bytes, their sha256) for a Model or a bundle path."""
    if isinstance(model_or_path, Model):
        model = _with_self_check(model_or_path)
        data = bundle.to_bytes(model.spec)
        return model, None, data, _sha256(data)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"pass a gru_engine.Model or a bundle path, got {type(model_or_path).__name__}")
    from . import load
    path = Path(model_or_path).resolve()
    model = load(path, verify=True)
    data = path.read_bytes()
    return model, str(path), data, _sha256(data)


def row_shape(model: Model, steps: int) -> tuple[int, ...]:
    """One row of the main output for windows of ``steps``: (D,) or (steps, D)."""
    return tuple(output_shapes(model.spec, model.shapes, 1, steps)[0][1:])


def warm(model: Model, thread_counts=None) -> None:
    """Compile (or load from Numba's on-disk cache) the kernels tasks run, for blocks (writable float32
    arrays) and each of ``thread_counts`` Numba threads per task (default: 1, the usual case, and this
    thread's count): serial kernels for 1, parallel ones above. Each variant is compiled once per
    machine and cached; a cold parallel compile takes far longer than a serial one."""
    import numba
    x = model.spec.self_check_input
    if x is None:
        return
    x = np.array(np.tile(x, (-(-PARALLEL_MIN_BATCH // x.shape[0]), 1, 1)))  # writable, >= PARALLEL_MIN_BATCH
    threads = numba.get_num_threads()
    try:
        for count in sorted(set(thread_counts or (1, threads))):
            numba.set_num_threads(count)
            model.predict_raw(x)
    finally:
        numba.set_num_threads(threads)


def current_client():
    """The distributed Client in use here, or None (Dask's local schedulers)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client
    try:
        return default_client()
    except ValueError:
        return None


def _host_report(path: str | None, sha256: str, dask_worker=None) -> tuple[str, int, bool]:
    """(host, usable cores, whether the bundle at ``path`` with this sha256 is readable): run on each worker."""
    from distributed.comm import get_address_host
    sees = False
    if path:
        try:
            sees = _sha256(Path(path).read_bytes()) == sha256
        except OSError:
            pass
    return get_address_host(dask_worker.address), usable_cores(), sees


def cluster_plan(client, path: str | None, sha256: str) -> tuple[tuple[tuple[str, int], ...], bool]:
    """(Numba threads per task for each host, whether every worker can load the bundle by path)."""
    reports = client.run(_host_report, path, sha256)
    threads_on_host: dict[str, int] = collections.Counter()
    for address, nthreads in client.nthreads().items():
        if address in reports:
            threads_on_host[reports[address][0]] += nthreads
    cores = {host: count for host, count, _ in reports.values()}
    plan = tuple(sorted((host, numba_threads_per_task(cores[host], threads)) for host, threads in threads_on_host.items()))
    return plan, bool(reports) and all(sees for _, _, sees in reports.values())


def _warm_worker(ticket: Ticket, data: bytes | None) -> None:
    """On a worker: load the model and compile only the kernels its tasks will run."""
    import numba
    model = worker_model(ticket, data)
    warm(model, (_task_threads(ticket) or numba.get_num_threads(),))


def warm_hosts(client, ticket: Ticket, data: bytes | None) -> None:
    """Load the model and the kernels on one worker per host, before the job: the host's other workers
    then find the kernels in Numba's cache instead of all compiling them at once. As a task, not
    ``client.run``, so a cold compile does not stall the worker's heartbeat."""
    from distributed.comm import get_address_host
    first = {}
    for address in client.nthreads():
        first.setdefault(get_address_host(address), address)
    futures = [client.submit(_warm_worker, ticket, data, workers=[address], pure=False)
               for address in first.values()]
    client.gather(futures)


def check_array(array, features: int) -> None:
    da = require("dask.array")
    if not isinstance(array, da.Array):
        raise InputError(f"pass a dask array (batch, time, {features}), got {type(array).__name__}; "
                         "wrap numpy data with dask.array.from_array(x, chunks=(rows, -1, -1))")
    if array.ndim != 3:
        raise InputError(f"the array must have shape (batch, time, {features}), got shape {array.shape}")
    if array.dtype.kind not in ACCEPTED_KINDS:
        raise InputError(f"the array has dtype {array.dtype}; pass a numeric array (it is cast to float32)")
    if array.shape[2] != features:
        raise InputError(f"the array has {array.shape[2]} features per time step; this model takes {features}")
    if len(array.chunks[1]) != 1 or len(array.chunks[2]) != 1:
        raise InputError(f"the array is chunked along time or features (chunks {array.chunksize}); chunk it "
                         "along the batch axis only: array.rechunk({1: -1, 2: -1})")
    if array.shape[1] == 0:
        raise InputError(f"the array has shape {array.shape}; time must be at least 1")


def predict(model_or_path, array, *, batch: int = DEFAULT_BATCH):
    """The model's main output for a dask array (batch, time, features) chunked along batch only.

    Returns a lazy dask array, (batch, D) or (batch, time, D) float32, one block per input block.
    ``model_or_path``: a bundle path (workers that can read it load it from there) or a Model
    (sent to each worker once). ``batch``: rows per Model.predict call inside a block.
    """
    require("dask.array")
    import dask
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InputError(f"batch must be a positive int, got {batch!r}")
    model, path, data, sha = ship(model_or_path)
    check_array(array, model.input_features)
    threads, visible = (), path is not None
    client = current_client()
    if client is None:
        warm(model)  # Dask's local schedulers run the tasks in this process
    else:
        threads, everywhere = cluster_plan(client, path, sha)
        visible = visible and everywhere
    ticket = Ticket(sha, path, row_shape(model, array.shape[1]), int(batch), threads)
    payload = None if visible else dask.delayed(data, name=f"gru-engine-bundle-{sha[:16]}", pure=True)
    if client is not None:
        warm_hosts(client, ticket, None if visible else data)
    shape = ticket.row_shape
    chunks = (array.chunks[0],) + tuple((size,) for size in shape)
    options = dict(dtype=np.float32, chunks=chunks, meta=np.empty((0,) * (1 + len(shape)), np.float32),
                   name=f"gru-engine-predict-{dask.base.tokenize(array.name, ticket)}")
    if len(shape) == 1:
        options["drop_axis"] = 2  # (n, T, F) -> (n, D)
    return array.map_blocks(predict_block, ticket, payload, **options)
