"""One registry of comparable implementations, shared by the parity tests and the benchmarks.

A ``Subject`` is one Keras model in every form the implementations need (bundle, ONNX graphs),
each made once, lazily. An ``Implementation`` turns a subject into a ``run(x) -> list of arrays``
callable; everything costly (JIT compile, session creation, tracing) happens in ``prepare``,
outside the call that is timed or compared.

Streaming implementations (``streaming=True``: engine-stream, ort-native-stream) return a
``Streaming`` run instead: ``start(batch)`` opens a stream with zero state and returns its
``step(x_t) -> (batch, D)``, which carries the state from call to call. Called on a window it
steps through it from zero state, so parity tests compare it like any other run; the benchmarks
time ``step`` itself, one time step per call. Chunked ones (``chunk > 0``: engine-run-<chunk>)
return a ``Chunked`` run: ``start(batch)`` returns ``feed(x (batch, chunk, features)) -> (batch,
chunk, D)``, timed per call and reported per step.

Implementations with ``named_only`` run only on workloads that list them (``Workload.runs``): the
chunked streams, and the engine without a bundle's transforms (``*-untransformed``).

Compiled implementations (c-export, c-export-stream) hand the runner a ``Looped`` call: besides
one call, it can repeat itself n times inside a compiled loop, so the time per call excludes the
ctypes call that a C user would not pay.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

# Steps per call of the chunked streams (engine-run-<chunk>): a sensor's sample up to a long block.
CHUNKS = (1, 16, 64, 256, 4096)
Run = Callable[[np.ndarray], list]
Step = Callable[[np.ndarray], np.ndarray]  # x_t (batch, features) -> output (batch, D); state carried


@dataclasses.dataclass(eq=False)  # identity hashing: artefacts are cached per subject
class Subject:
    """A Keras model and the artefacts derived from it, written under ``workdir``."""

    keras_model: object
    name: str = "model"
    workdir: Path | None = None
    transforms: list = dataclasses.field(default_factory=list)  # the bundle's, see gru_engine.transforms

    def __post_init__(self):
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="gru-engine-"))
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._onnx_paths: dict[tuple[str, bool], Path] = {}

    @functools.cached_property
    def spec(self):
        from gru_engine.exporters import read_keras
        spec = read_keras(self.keras_model)
        spec.transforms = list(self.transforms)
        return spec

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
class Chunked:
    """What a chunked implementation's ``prepare`` returns (see the module docstring)."""

    start: Callable[[int], Callable[[np.ndarray], np.ndarray]]  # batch -> feed of a fresh zero-state stream
    chunk: int
    sequence_output: bool

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        feed = self.start(x.shape[0])
        outputs = np.concatenate([feed(np.ascontiguousarray(x[:, t:t + self.chunk])).copy()
                                  for t in range(0, x.shape[1], self.chunk)], axis=1)  # (batch, T, D)
        return [outputs if self.sequence_output else outputs[:, -1]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    prepare: Callable[[Subject, int], Run]  # (subject, threads) -> run; a Streaming when streaming
    requires: tuple[str, ...] = ()          # importable modules it needs
    # Why it cannot run the subject's model (None: it can).
    does_not_apply: Callable[[Subject], str | None] = lambda subject: None
    streaming: bool = False                 # one time step per call, state carried between calls
    chunk: int = 0                          # time steps per call of a chunked stream (streaming too)
    named_only: bool = False                # runs only on workloads that name it
    same_output: bool = True                # its output is comparable with gru-engine's (same units)

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


def _untransformed(subject: Subject):
    """The subject's network without the bundle's transforms: what they cost is measured against it."""
    import gru_engine
    return gru_engine.Model(dataclasses.replace(gru_engine.load(subject.bundle_path).spec, transforms=[]))


def _engine_untransformed(subject: Subject, threads: int) -> Run:
    import numba
    numba.set_num_threads(threads)
    model = _untransformed(subject)
    return lambda x: as_list(model.predict(x))


def _engine_stream_untransformed(subject: Subject, threads: int) -> Streaming:
    model = _untransformed(subject)
    return Streaming(lambda batch: model.stream(batch=batch).step, subject.sequence_output)


def _engine_run(chunk: int) -> Callable[[Subject, int], Chunked]:
    def prepare(subject: Subject, threads: int) -> Chunked:
        import gru_engine
        model = gru_engine.load(subject.bundle_path)

        def start(batch: int):
            stream = model.stream(batch=batch)
            out = np.empty((batch, chunk, model.shapes[-1].output_dim), np.float32)  # reused, as a user would
            return lambda x: stream.run(x, out=out if x.shape[1] == chunk else None)
        return Chunked(start, chunk, subject.sequence_output)
    return prepare


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


# ----- the exported C, timed by a compiled loop -----------------------------------------------------

# n back-to-back calls with no Python in between: the benchmark's timed unit.
C_LOOP_PREDICT = """#include "model.h"

void loop_predict(const float *x, size_t batch, size_t steps, float *y, float *work, size_t n);

void loop_predict(const float *x, size_t batch, size_t steps, float *y, float *work, size_t n)
{
    const size_t rows = model_output_steps(steps);
    size_t i, s;
    for (i = 0; i < n; i++)
        for (s = 0; s < batch; s++)
            model_predict(x + s * steps * MODEL_INPUT_FEATURES, steps, y + s * rows * MODEL_OUTPUT_FEATURES, work);
}
"""
C_LOOP_STEP = """
void loop_step(model_state *states, const float *x, size_t batch, float *y, size_t n);

void loop_step(model_state *states, const float *x, size_t batch, float *y, size_t n)
{
    size_t i, s;
    for (i = 0; i < n; i++)
        for (s = 0; s < batch; s++)
            model_step(states + s, x + s * MODEL_INPUT_FEATURES, y + s * MODEL_OUTPUT_FEATURES);
}
"""


@dataclasses.dataclass(frozen=True)
class Looped:
    """A call (``once``: one window or step, returning its output) that a compiled loop also repeats:
    ``loop(n)`` makes n calls inside C, so the runner times C without Python's overhead per call."""

    once: Callable[[], object]
    loop: Callable[[int], None]

    def __call__(self):
        return self.once()

    def timed(self, seconds: float) -> tuple[Callable[[], None], int]:
        """A zero-argument call of ``loop(n)``, n chosen so that it lasts about ``seconds``; and n."""
        import time
        n = 1
        while True:
            start = time.perf_counter()
            self.loop(n)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 4 or n >= 1 << 24:
                n = max(1, round(n * seconds / max(elapsed, 1e-9)))
                return (lambda: self.loop(n)), n
            n *= 4


@functools.cache
def _compiled_c(subject: Subject):
    """The subject exported with export_c and compiled with -O3 -march=native beside the C loops."""
    import ctypes

    from gru_engine.exporters import c_build
    from gru_engine.exporters.c_writer import build_c

    if c_build.compiler() is None:
        raise ImportError("no C compiler (cc) on PATH")
    directory = subject.workdir / "c-export"
    directory.mkdir(exist_ok=True)
    code = build_c(subject.spec, "model", origin=f"benchmark model {subject.name}")
    (directory / "model.h").write_text(code.header)
    (directory / "model.c").write_text(code.source)
    (directory / "loop.c").write_text(C_LOOP_PREDICT + (C_LOOP_STEP if code.report["can_stream"] else ""))
    library_path = c_build.build([directory / "model.c", directory / "loop.c"], directory / "libmodel.so",
                                 flags=c_build.FAST_FLAGS, extra=("-shared", "-fPIC", f"-I{directory}"))
    library = ctypes.CDLL(str(library_path))
    return c_build.CModel(library, "model", code)


def _c_export(subject: Subject, threads: int) -> Callable:
    import ctypes

    from gru_engine.exporters.c_build import FLOATS as floats
    c_model = _compiled_c(subject)
    c_model.library.loop_predict.argtypes = [floats, ctypes.c_size_t, ctypes.c_size_t, floats, floats, ctypes.c_size_t]

    class Run:
        def __call__(self, x):
            return self.looped(x)()

        def looped(self, x):
            x = np.ascontiguousarray(x, np.float32)  # (batch, steps, features)
            batch, steps = x.shape[:2]
            rows = c_model.output_steps(steps)
            y = np.empty((batch, rows * c_model.output_features), np.float32)
            work = c_model.work(steps)

            def loop(n):
                c_model.library.loop_predict(x, batch, steps, y, work, n)

            def once():
                loop(1)
                return [y.reshape((batch, rows, -1) if c_model.output_is_sequence else (batch, -1)).copy()]
            return Looped(once, loop)
    return Run()


def _c_export_stream(subject: Subject, threads: int) -> Streaming:
    import ctypes

    from gru_engine.exporters.c_build import FLOATS as floats
    c_model = _compiled_c(subject)
    c_model.library.loop_step.argtypes = [ctypes.c_char_p, floats, ctypes.c_size_t, floats, ctypes.c_size_t]

    class Step:
        def __init__(self, batch):
            self.batch = batch
            self.states = ctypes.create_string_buffer(c_model.state_bytes * batch)  # zero: NAME_reset's state

        def __call__(self, x_t):
            return self.looped(x_t)()

        def looped(self, x_t):
            x_t = np.ascontiguousarray(x_t, np.float32)  # (batch, features)
            y = np.empty((self.batch, c_model.output_features), np.float32)

            def loop(n):
                c_model.library.loop_step(self.states, x_t, self.batch, y, n)

            def once():
                loop(1)
                return y.copy()
            return Looped(once, loop)
    return Streaming(Step, subject.sequence_output)


def _cannot_stream(subject: Subject) -> str | None:
    return None if subject.streamable else "the model reads sequences backwards; it cannot stream"


def _cannot_write_c(subject: Subject) -> str | None:
    from gru_engine.exporters.c_layers import FAMILIES
    others = sorted({layer.kind for layer in subject.spec.layers} - set(FAMILIES))
    return f"the C writer does not write {', '.join(others)} layers yet" if others else None


def _cannot_stream_c(subject: Subject) -> str | None:
    return _cannot_write_c(subject) or _cannot_stream(subject)


IMPLEMENTATIONS = {
    impl.name: impl for impl in [
        Implementation("engine", "gru-engine Model.predict", _engine, ("numba",)),
        Implementation("engine-stream", "gru-engine Stream.step, one step per call", _engine_stream, ("numba",),
                       does_not_apply=_cannot_stream, streaming=True),
        Implementation("engine-untransformed", "gru-engine Model.predict, the same network without transforms",
                       _engine_untransformed, ("numba",), named_only=True, same_output=False),
        Implementation("engine-stream-untransformed", "gru-engine Stream.step, the same network without "
                       "transforms", _engine_stream_untransformed, ("numba",),
                       does_not_apply=_cannot_stream, streaming=True, named_only=True,
                       same_output=False),
        *(Implementation(f"engine-run-{chunk}", f"gru-engine Stream.run on chunks of {chunk} steps, per step",
                         _engine_run(chunk), ("numba",), does_not_apply=_cannot_stream,
                         streaming=True, chunk=chunk, named_only=True) for chunk in CHUNKS),
        Implementation("ort-native", "onnxruntime, native ONNX GRU graph", _onnxruntime("native"),
                       ("onnxruntime", "onnx")),
        Implementation("ort-native-stream", "onnxruntime, native GRU graph, T=1 per call, state fed back",
                       _ort_native_stream, ("onnxruntime", "onnx"),
                       does_not_apply=_cannot_stream, streaming=True),
        Implementation("ort-tf2onnx", "onnxruntime, tf2onnx graph", _onnxruntime("tf2onnx"),
                       ("onnxruntime", "tf2onnx", "tensorflow")),
        Implementation("tf-function", "TensorFlow tf.function", _tf_function(False), ("tensorflow",)),
        Implementation("tf-xla", "TensorFlow tf.function(jit_compile=True)", _tf_function(True), ("tensorflow",)),
        Implementation("keras-predict", "Keras model.predict", _keras_predict, ("keras",)),
        Implementation("keras-call", "Keras model(x)", _keras_call, ("keras",)),
        Implementation("c-export", "export_c's C99 predict, -O3 -march=native (512-bit vectors on x86-64), "
                       "timed in a C loop, 1 thread", _c_export, ("numpy",), does_not_apply=_cannot_write_c),
        Implementation("c-export-stream", "export_c's C99 step, -O3 -march=native (512-bit vectors on x86-64), "
                       "timed in a C loop", _c_export_stream, ("numpy",), does_not_apply=_cannot_stream_c,
                       streaming=True),
    ]
}
