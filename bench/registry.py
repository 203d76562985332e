"""One registry of comparable implementations, shared by the parity tests and the benchmarks.

A ``Subject`` is one Keras model in every form the implementations need (bundle, ONNX graphs),
each made once, lazily. An ``Implementation`` turns a subject into a ``run(x) -> list of arrays``
callable; everything costly (JIT compile, session creation, tracing) happens in ``prepare``,
outside the call that is timed or compared.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

Run = Callable[[np.ndarray], list]


@dataclasses.dataclass
class Subject:
    """A Keras model and the artefacts derived from it, written under ``workdir``."""

    keras_model: object
    name: str = "model"
    workdir: Path | None = None

    def __post_init__(self):
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gru-engine-"))
        self.workdir = Path(self.workdir)

    @functools.cached_property
    def spec(self):
        from gru_engine.exporters import read_keras
        return read_keras(self.keras_model)

    @functools.cached_property
    def bundle_path(self) -> Path:
        from gru_engine import bundle
        return bundle.save(self.spec, self.workdir / f"{self.name}.gru.safetensors")

    @functools.cache
    def onnx_path(self, method: str) -> Path:
        from gru_engine.exporters import export_onnx
        return export_onnx(self.keras_model, self.workdir / f"{self.name}.{method}.onnx", method=method)

    @property
    def streamable(self) -> bool:
        return not any(layer.kind == "bidirectional" or (layer.kind == "gru" and layer.config["go_backwards"])
                       for layer in self.spec.layers)


def as_list(outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outputs] if isinstance(outputs, (list, tuple)) else [np.asarray(outputs)]


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    prepare: Callable[[Subject, int], Run]  # (subject, threads) -> run
    requires: tuple[str, ...] = ()          # importable modules it needs
    applies: Callable[[Subject], bool] = lambda subject: True

    def available(self) -> bool:
        import importlib.util
        return all(importlib.util.find_spec(module) is not None for module in self.requires)


def _engine(subject: Subject, threads: int) -> Run:
    import numba

    import gru_engine
    numba.set_num_threads(threads)
    model = gru_engine.load(subject.bundle_path)
    return lambda x: as_list(model.predict(x))


def _engine_stream(subject: Subject, threads: int) -> Run:
    """Feed x one step at a time; the last step's output is what predict returns for the window."""
    import gru_engine
    model = gru_engine.load(subject.bundle_path)
    streams = {}

    def run(x):
        stream = streams.get(x.shape[0])
        if stream is None:
            stream = streams[x.shape[0]] = model.stream(batch=x.shape[0])
        stream.reset()
        steps = [stream.step(x[:, t]) for t in range(x.shape[1])]
        sequence_output = model.shapes[-1].output_is_sequence
        return [np.stack(steps, axis=1) if sequence_output else steps[-1]]
    return run


def _onnxruntime(method: str) -> Callable[[Subject, int], Run]:
    def prepare(subject: Subject, threads: int) -> Run:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(subject.onnx_path(method)), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda x: session.run(None, {input_name: x})
    return prepare


def _tf_function(jit_compile: bool) -> Callable[[Subject, int], Run]:
    def prepare(subject: Subject, threads: int) -> Run:
        import tensorflow as tf
        model = subject.keras_model
        function = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, reduce_retracing=True)
        return lambda x: as_list(tf.nest.map_structure(lambda t: t.numpy(), function(tf.constant(x))))
    return prepare


def _keras_predict(subject: Subject, threads: int) -> Run:
    model = subject.keras_model
    return lambda x: as_list(model.predict(x, verbose=0, batch_size=max(len(x), 1)))


def _keras_call(subject: Subject, threads: int) -> Run:
    model = subject.keras_model
    return lambda x: [np.asarray(o) for o in as_list(model(x, training=False))]


IMPLEMENTATIONS = {
    impl.name: impl for impl in [
        Implementation("engine", "gru-engine Model.predict", _engine, ("numba",)),
        Implementation("engine-stream", "gru-engine Stream.step, one step per call", _engine_stream, ("numba",),
                       applies=lambda subject: subject.streamable),
        Implementation("ort-native", "onnxruntime, native ONNX GRU graph", _onnxruntime("native"),
                       ("onnxruntime", "onnx")),
        Implementation("ort-tf2onnx", "onnxruntime, tf2onnx graph", _onnxruntime("tf2onnx"),
                       ("onnxruntime", "tf2onnx", "tensorflow")),
        Implementation("tf-function", "TensorFlow tf.function", _tf_function(False), ("tensorflow",)),
        Implementation("tf-xla", "TensorFlow tf.function(jit_compile=True)", _tf_function(True), ("tensorflow",)),
        Implementation("keras-predict", "Keras model.predict", _keras_predict, ("keras",)),
        Implementation("keras-call", "Keras model(x)", _keras_call, ("keras",)),
    ]
}


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of reports and test logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
