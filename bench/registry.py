"""One registry of comparable implementations, shared by the parity tests and the benchmarks.

A ``Subject`` is one Keras model in every form the implementations need (bundle, ONNX graphs),
each made once, lazily. An ``Implementation`` turns a subject into a ``run(x) -> list of arrays``
callable; everything costly (JIT compile, session creation, tracing) happens in ``prepare``,
outside the call that is timed or compared.

Streaming implementations (``streaming=True``: engine-stream, ort-native-stream) return a
``Streaming`` run instead: ``start(batch)`` opens a stream with zero state and returns its
``step(x_t) -> (batch, D)``, which carries the state from call to call. Called on a window it
steps through it from zero state, so parity tests compare it like any other run; the benchmarks
time ``step`` itself, one time step per call.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

Run = Callable[[np.ndarray], list]
Step = Callable[[np.ndarray], np.ndarray]  # x_t (batch, features) -> output (batch, D); state carried


@dataclasses.dataclass(eq=False)  # identity hashing: artefacts are cached per subject
class Subject:
    """A Keras model and the artefacts derived from it, written under ``workdir``."""

    keras_model: object
    name: str = "model"
    workdir: Path | None = None

    def __post_init__(self):
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gru-engine-"))
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._onnx_paths: dict[tuple[str, bool], Path] = {}

    @functools.cached_property
    def spec(self):
        from gru_engine.exporters import read_keras
        return read_keras(self.keras_model)

    @functools.cached_property
    def bundle_path(self) -> Path:
        from gru_engine import bundle
        return bundle.save(self.spec, self.workdir / f"{self.name}.gru.safetensors")

    def onnx_path(self, method: str, state_io: bool = False) -> Path:
        """The model exported to ONNX by ``method``; ``state_io`` adds carried-state inputs and outputs."""
        key = (method, state_io)
        if key not in self._onnx_paths:
            from gru_engine.exporters import export_onnx
            suffix = ".state" if state_io else ""
            self._onnx_paths[key] = Path(export_onnx(
                self.keras_model, self.workdir / f"{self.name}.{method}{suffix}.onnx", method=method,
                state_io=state_io))
        return self._onnx_paths[key]

    @property
    def streamable(self) -> bool:
        return streamable(self.spec)

    @property
    def sequence_output(self) -> bool:
        """Whether the model's (first) output has a time axis."""
        from gru_engine.spec import validate
        return validate(self.spec)[-1].output_is_sequence


def streamable(spec) -> bool:
    """Whether a model can run one step at a time (see ``gru_engine.spec.stream_blockers``)."""
    from gru_engine.spec import backward_layers
    return not backward_layers(spec)


def as_list(outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outputs] if isinstance(outputs, (list, tuple)) else [np.asarray(outputs)]


@dataclasses.dataclass(frozen=True)
class Streaming:
    """What a streaming implementation's ``prepare`` returns (see the module docstring)."""

    start: Callable[[int], Step]  # batch -> step function of a fresh zero-state stream
    sequence_output: bool         # the window output is every step's output, else the last one

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        step = self.start(x.shape[0])
        outputs = [step(x[:, t]) for t in range(x.shape[1])]  # each (batch, D)
        return [np.stack(outputs, axis=1) if self.sequence_output else outputs[-1]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    prepare: Callable[[Subject, int], Run]  # (subject, threads) -> run; a Streaming when streaming
    requires: tuple[str, ...] = ()          # importable modules it needs
    applies: Callable[[Subject], bool] = lambda subject: True
    streaming: bool = False                 # one time step per call, state carried between calls

    def available(self) -> bool:
        import importlib.util
        return all(importlib.util.find_spec(module) is not None for module in self.requires)


def _engine(subject: Subject, threads: int) -> Run:
    import numba

    import gru_engine
    numba.set_num_threads(threads)
    model = gru_engine.load(subject.bundle_path)
    return lambda x: as_list(model.predict(x))


def _engine_stream(subject: Subject, threads: int) -> Streaming:
    import gru_engine
    model = gru_engine.load(subject.bundle_path)
    return Streaming(lambda batch: model.stream(batch=batch).step, subject.sequence_output)


def _session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnxruntime(method: str) -> Callable[[Subject, int], Run]:
    def prepare(subject: Subject, threads: int) -> Run:
        session = _session(subject.onnx_path(method), threads)
        input_name = session.get_inputs()[0].name
        return lambda x: session.run(None, {input_name: x})
    return prepare


def _ort_native_stream(subject: Subject, threads: int) -> Streaming:
    """The loop an onnxruntime user writes to stream: T=1 per call, each ``state_<k>`` fed back."""
    session = _session(subject.onnx_path("native", state_io=True), threads)
    state_names = [i.name for i in session.get_inputs() if i.name.startswith("initial_state_")]
    input_name = next(i.name for i in session.get_inputs() if i.name not in state_names)
    output_name = next(o.name for o in session.get_outputs() if not o.name.startswith("state_"))
    carried_names = ["state_" + name[len("initial_state_"):] for name in state_names]
    # (units,) per GRU direction, (steps, channels) per causal Conv1D history
    dims = [tuple(int(d) for d in i.shape[1:]) for i in session.get_inputs() if i.name in state_names]

    def start(batch: int) -> Step:
        feeds = {name: np.zeros((batch,) + shape, np.float32) for name, shape in zip(state_names, dims)}

        def step(x_t: np.ndarray) -> np.ndarray:
            feeds[input_name] = np.ascontiguousarray(x_t[:, None, :], np.float32)  # (batch, 1, features)
            output, *carried = session.run([output_name] + carried_names, feeds)
            feeds.update(zip(state_names, carried))  # each (batch, units)
            return output.reshape(batch, -1)  # (batch, 1, D) or (batch, D) -> (batch, D)
        return step
    return Streaming(start, subject.sequence_output)


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
                       applies=lambda subject: subject.streamable, streaming=True),
        Implementation("ort-native", "onnxruntime, native ONNX GRU graph", _onnxruntime("native"),
                       ("onnxruntime", "onnx")),
        Implementation("ort-native-stream", "onnxruntime, native GRU graph, T=1 per call, state fed back",
                       _ort_native_stream, ("onnxruntime", "onnx"),
                       applies=lambda subject: subject.streamable, streaming=True),
        Implementation("ort-tf2onnx", "onnxruntime, tf2onnx graph", _onnxruntime("tf2onnx"),
                       ("onnxruntime", "tf2onnx", "tensorflow")),
        Implementation("tf-function", "TensorFlow tf.function", _tf_function(False), ("tensorflow",)),
        Implementation("tf-xla", "TensorFlow tf.function(jit_compile=True)", _tf_function(True), ("tensorflow",)),
        Implementation("keras-predict", "Keras model.predict", _keras_predict, ("keras",)),
        Implementation("keras-call", "Keras model(x)", _keras_call, ("keras",)),
    ]
}

