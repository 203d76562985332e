"""The machine a benchmark runs on, and the thread settings every implementation gets.

TensorFlow fixes its thread pools when its runtime starts, so thread counts are pinned once, at the
start of a benchmark process, before any model is built: numba's pool, TensorFlow's intra- and
inter-op pools, and (through the environment the parent process sets) the BLAS behind numpy.
onnxruntime takes its count per session (``registry._session``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

# Distribution names whose versions a report states (the first installed name of each group counts).
LIBRARIES = {
    "gru-engine": ("gru-engine",),
    "numpy": ("numpy",),
    "numba": ("numba",),
    "onnxruntime": ("onnxruntime",),
    "onnx": ("onnx",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
    "tf2onnx": ("tf2onnx",),
}
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def all_cores() -> int:
    """Cores this process may run on (respects taskset and container CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for library, distributions in LIBRARIES.items():
        found[library] = None
        for distribution in distributions:
            try:
                found[library] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def describe() -> dict:
    return {"cpu": cpu_model(), "cores": all_cores(), "logical_cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": versions()}


def thread_environment(threads: int) -> dict[str, str]:
    """Environment for a benchmark process: BLAS pools are sized when numpy loads, so set them first."""
    env = dict(os.environ, **{name: str(threads) for name in BLAS_THREAD_VARIABLES})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def pin_threads(threads: int) -> dict:
    """Give numba and TensorFlow ``threads`` threads; returns the settings in force afterwards."""
    import importlib.util

    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    settings = {"requested": threads, "numba": numba.get_num_threads(), "onnxruntime_intra_op": threads,
                "blas": {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES}, "tensorflow": None}
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # TensorFlow already started in this process: report what it runs with
        settings["tensorflow"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                  "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    return settings
