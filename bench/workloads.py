"""Benchmark workloads: a model recipe, an input shape, a thread count, timed per window or per step.

Workloads are plain data (``to_dict`` / ``from_dict``) so the runner can hand them to a worker
process. Built-in models have Keras's own initial weights, drawn from a fixed seed, so every run
measures the same model:

- ``airline``: GRU(50, return_sequences=True) -> GRU(50) -> Dense(1), one feature, T=10 (the
  airline-passengers forecaster).
- ``gru<H>``:  GRU(H) -> Dense(1), one feature: the sweeps over hidden size and sequence length.
- ``lstm-airline``: the airline shape with LSTM layers, LSTM(50) -> LSTM(50) -> Dense(1).
- ``guitar``:  GuitarLSTM's shape, Conv1D(16, 12, strides 4, same) -> Conv1D(16, 12, strides 3, same)
  -> LSTM(36) -> Dense(1) over windows of 120 samples.
- ``causal``:  Conv1D(16, 3, causal, dilation 2, tanh) -> GRU(32) -> Dense(1): a convolutional
  front-end that streams, one sample per step.

- ``airline-tutorial``, ``airline-level``: the airline network (same weights) in a bundle with the
  demo's transforms (tutorial: min-max scaling, an affine step; level: log, then the window's mean
  removed), timed against the same network without them; their inputs are passenger counts.

Threads: one for latency (batch 1 and 32, per-step streaming), every core for batch-1024 throughput.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .machine import all_cores

AIRLINE_UNITS = (50, 50)
AIRLINE_STEPS = 10
HIDDEN_SIZES = (16, 32, 64, 128, 256)
# T of the hidden-size sweep: long enough that the recurrence, not the per-call overhead, dominates.
HIDDEN_SWEEP_STEPS = 100
SEQUENCE_LENGTHS = (10, 100, 1000)
# H of the sequence-length sweep: the airline model's width.
SEQUENCE_SWEEP_UNITS = 50
# The H=256, T=1000, batch 1 target case, where GFLOP/s are compared with numpy's sgemm.
GFLOP_UNITS, GFLOP_STEPS = 256, 1000
THROUGHPUT_BATCH = 1024
# Names of the workloads the project's performance targets are measured on.
AIRLINE_B1 = "airline-b1"
AIRLINE_THROUGHPUT = f"airline-b{THROUGHPUT_BATCH}"
GFLOP_CASE = f"h{GFLOP_UNITS}-t{GFLOP_STEPS}"
AIRLINE_STEP = "airline-step"
LSTM_AIRLINE_B1 = "lstm-airline-b1"
LSTM_AIRLINE_THROUGHPUT = f"lstm-airline-b{THROUGHPUT_BATCH}"
LSTM_AIRLINE_STEP = "lstm-airline-step"
GUITAR_B1 = "guitar-b1"
CAUSAL_CONV_STEP = "causal-conv-step"
# Conv1D layers before the GRUs: (filters, kernel_size, strides, padding, dilation_rate, activation).
GUITAR_FRONT = ((16, 12, 4, "same", 1, "linear"), (16, 12, 3, "same", 1, "linear"))
GUITAR_WINDOW = 120
CAUSAL_FRONT = ((16, 3, 1, "causal", 2, "tanh"),)
AIRLINE_CHUNKS = "airline-chunks"
TRANSFORM_CASES = ("airline-tutorial-b1", "airline-tutorial-step", "airline-level-b1")


def threads_label(threads) -> str:
    return f"{threads} thread{'s' if int(threads) > 1 else ''}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to get a Keras model: built from Conv1D layers and stacked GRU or LSTM widths, or loaded from a
    user's file."""

    key: str                      # workloads with the same key share one model (and its exports)
    features: int = 1
    units: tuple[int, ...] = ()   # layer widths; every layer but the last returns sequences; then Dense(1)
    seed: int = 0
    keras_path: str | None = None
    front: tuple = ()             # Conv1D layers before the recurrent ones, see GUITAR_FRONT
    cell: str = "gru"             # the recurrent layers' kind: gru or lstm
    transforms: str = ""          # "tutorial" or "level": the demo's transforms of that name, in the bundle

    def build(self):
        if self.keras_path:
            from gru_engine.exporters.keras_reader import load_keras
            return load_keras(self.keras_path)
        import keras
        keras.utils.set_random_seed(self.seed)
        layers = [keras.Input((None, self.features))]
        layers += [keras.layers.Conv1D(filters, size, strides=strides, padding=padding, dilation_rate=dilation,
                                       activation=activation)
                   for filters, size, strides, padding, dilation, activation in self.front]
        layers += [getattr(keras.layers, self.cell.upper())(width, return_sequences=index < len(self.units) - 1)
                   for index, width in enumerate(self.units)]
        layers.append(keras.layers.Dense(1))
        return keras.Sequential(layers, name=self.key)

    def transform_steps(self) -> list:
        """The demo's transforms named by ``transforms`` (fitted on the shipped series, no training)."""
        if not self.transforms:
            return []
        from gru_engine import demo_data
        if self.transforms == "level":
            return demo_data.level_approach().transforms
        return demo_data.tutorial_approach(demo_data.make_windows(*demo_data.load_series())).transforms

    def describe(self) -> str:
        if self.keras_path:
            return Path(self.keras_path).name
        convolutions = [f"Conv1D({filters},{size}{f',s{strides}' if strides > 1 else ''}"
                        f"{f',d{dilation}' if dilation > 1 else ''},{padding})"
                        for filters, size, strides, padding, dilation, _ in self.front]
        layers = "->".join(convolutions + [f"{self.cell.upper()}({width})" for width in self.units] + ["Dense(1)"])
        transforms = ", ".join(step["kind"] for step in self.transform_steps())
        return f"{layers}, {self.features} feature{'s' if self.features > 1 else ''}" + \
            (f", {self.transforms} transforms ({transforms})" if transforms else "")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    recipe: Recipe
    batch: int
    steps: int        # T of a window; per-step workloads time one step of a stream
    threads: int
    per_step: bool = False
    implementations: tuple[str, ...] = ()  # only these; default: all of its kind but the named-only ones

    def runs(self, impl) -> bool:
        """Whether this workload times the registry implementation ``impl``."""
        if impl.streaming != self.per_step:
            return False
        return impl.name in self.implementations if self.implementations or impl.named_only else True

    @property
    def title(self) -> str:
        shape = "one step per call" if self.per_step else f"T={self.steps} per call"
        if self.name == AIRLINE_CHUNKS:
            shape = "per step, fed one step or a chunk of steps per call"
        return f"{self.recipe.describe()}; batch {self.batch}, {shape}, {threads_label(self.threads)}"

    @property
    def items_per_call(self) -> int:
        """Sequences per call (windows), or sample-steps per call (streaming)."""
        return self.batch

    def input(self, seed: int = 1) -> np.ndarray:
        """A standard normal (batch, steps, features) float32 input, or passenger counts (100 to 600)
        for a bundle with transforms; streams read its first step."""
        rng = np.random.default_rng(seed)
        shape = (self.batch, self.steps, self.recipe.features)
        if self.recipe.transforms:
            return rng.uniform(100.0, 600.0, shape).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        recipe = dict(data["recipe"], units=tuple(data["recipe"]["units"]),
                      front=tuple(tuple(layer) for layer in data["recipe"]["front"]))
        return cls(**dict(data, recipe=Recipe(**recipe), implementations=tuple(data["implementations"])))


def airline_recipe(transforms: str = "") -> Recipe:
    return Recipe("-".join(filter(None, ("airline", transforms))), 1, AIRLINE_UNITS, transforms=transforms)


def transform_workloads() -> list[Workload]:
    """The demo's two bundles at batch 1 (and the tutorial's stream; the level bundle's per-window
    mean cannot stream), each against the same network without transforms, interleaved."""
    window, step = ("engine", "engine-untransformed"), ("engine-stream", "engine-stream-untransformed")
    tutorial, level = airline_recipe("tutorial"), airline_recipe("level")
    return [Workload("airline-tutorial-b1", tutorial, 1, AIRLINE_STEPS, 1, implementations=window),
            Workload("airline-tutorial-step", tutorial, 1, AIRLINE_STEPS, 1, per_step=True, implementations=step),
            Workload("airline-level-b1", level, 1, AIRLINE_STEPS, 1, implementations=window)]


def chunk_workload() -> Workload:
    """A stream fed one step per call, or chunks of steps per call, reported per step; beside them the
    exported C stepping the same model, so its step is compared with the chunks in the same rounds."""
    from .registry import CHUNKS
    return Workload(AIRLINE_CHUNKS, airline_recipe(), 1, AIRLINE_STEPS, 1, per_step=True,
                    implementations=("engine-stream",) + tuple(f"engine-run-{chunk}" for chunk in CHUNKS)
                    + ("c-export-stream",))


def lstm_airline_recipe() -> Recipe:
    return Recipe("lstm-airline", 1, AIRLINE_UNITS, cell="lstm")


def lstm_workloads(cores: int) -> list[Workload]:
    """The airline shape with LSTM layers: batch 1, batch 1024 on every core, one streamed step."""
    lstm = lstm_airline_recipe()
    return [Workload(LSTM_AIRLINE_B1, lstm, 1, AIRLINE_STEPS, 1),
            Workload(LSTM_AIRLINE_THROUGHPUT, lstm, THROUGHPUT_BATCH, AIRLINE_STEPS, cores),
            Workload(LSTM_AIRLINE_STEP, lstm, 1, AIRLINE_STEPS, 1, per_step=True)]


def _single(units: int) -> Recipe:
    return Recipe(f"gru{units}", 1, (units,))


def guitar_recipe() -> Recipe:
    return Recipe("guitar", 1, (36,), front=GUITAR_FRONT, cell="lstm")


def causal_recipe() -> Recipe:
    return Recipe("causal", 1, (32,), front=CAUSAL_FRONT)


def builtin_workloads(quick: bool = False, cores: int | None = None) -> list[Workload]:
    """The standard comparison; ``quick`` keeps one workload per target plus streaming."""
    cores = cores or all_cores()
    airline = airline_recipe()
    gflop_case = Workload(GFLOP_CASE, _single(GFLOP_UNITS), 1, GFLOP_STEPS, 1)
    airline_b1 = Workload(AIRLINE_B1, airline, 1, AIRLINE_STEPS, 1)
    throughput = Workload(AIRLINE_THROUGHPUT, airline, THROUGHPUT_BATCH, AIRLINE_STEPS, cores)
    stream = Workload(AIRLINE_STEP, airline, 1, AIRLINE_STEPS, 1, per_step=True)
    front_ends = [Workload(GUITAR_B1, guitar_recipe(), 1, GUITAR_WINDOW, 1),
                  Workload(CAUSAL_CONV_STEP, causal_recipe(), 1, AIRLINE_STEPS, 1, per_step=True)]
    if quick:
        return ([airline_b1, throughput, gflop_case, stream] + lstm_workloads(cores) + front_ends
                + transform_workloads() + [chunk_workload()])
    workloads = [airline_b1, Workload("airline-b32", airline, 32, AIRLINE_STEPS, 1), throughput]
    workloads += [Workload(f"h{units}-t{HIDDEN_SWEEP_STEPS}", _single(units), 1, HIDDEN_SWEEP_STEPS, 1)
                  for units in HIDDEN_SIZES]
    workloads += [Workload(f"h{SEQUENCE_SWEEP_UNITS}-t{steps}", _single(SEQUENCE_SWEEP_UNITS), 1, steps, 1)
                  for steps in SEQUENCE_LENGTHS]
    workloads += [gflop_case, stream,
                  Workload(f"h{GFLOP_UNITS}-step", _single(GFLOP_UNITS), 1, 1, 1, per_step=True)]
    return workloads + lstm_workloads(cores) + front_ends + transform_workloads() + [chunk_workload()]


def user_workloads(model_path, steps: int | None = None) -> list[Workload]:
    """Batch-1 workloads for a user's .keras/.h5 model: per window, and per step when it can stream.

    T comes from the model's input shape, else from ``steps``.
    """
    from gru_engine.errors import InputError
    from gru_engine.exporters.keras_reader import load_keras, read_keras

    from .registry import streamable

    path = Path(model_path)
    model = load_keras(path)
    shape = model.inputs[0].shape  # (batch, time, features)
    if len(shape) != 3 or shape[-1] is None:
        raise InputError(f"{path}: input shape {shape}; a benchmarkable model takes (batch, time, features)")
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    steps = steps or shape[1]
    if not steps:
        raise InputError(f"{path}: the model's time dimension is not fixed; say how long a window is: --steps N")
    if shape[1] and steps != shape[1]:
        raise InputError(f"{path}: the model takes exactly T={shape[1]} time steps; drop --steps {steps}")
    recipe = Recipe("user-" + path.name.split(".")[0], int(shape[-1]), keras_path=str(path.resolve()))
    batch = shape[0] or 1
    workloads = [Workload(f"{recipe.key}-b{batch}", recipe, batch, steps, 1)]
    if streamable(read_keras(model)):
        workloads.append(Workload(f"{recipe.key}-step", recipe, batch, steps, 1, per_step=True))
    return workloads
