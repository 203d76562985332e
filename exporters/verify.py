"""``gru-engine verify``: Keras vs the engine (a bundle) vs onnxruntime on random inputs of the model's shape.

Every comparison is in the network's own units: a bundle's input/output transforms are skipped
(``Model.predict_raw``), since the Keras model knows nothing of them. A pair agrees when every
element is within the parity tolerance, |other - keras| <= PARITY_ATOL + PARITY_RTOL * |keras|
(``gru_engine.spec.max_excess`` <= 0).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from gru_engine import frontends
from gru_engine.errors import InputError
from gru_engine.spec import PARITY_ATOL, PARITY_RTOL, max_excess, sample_input

# (batch, time) of each random draw, unless the model fixes them: a single sample and a small batch.
DRAWS = ((1, 7), (4, 16))


@dataclasses.dataclass(frozen=True)
class Difference:
    """How far one implementation's outputs are from the reference's."""

    largest: float  # max |other - reference| over every output element
    excess: float   # max_excess: > 0 means beyond the parity tolerance somewhere
    problem: str = ""  # set when the outputs cannot be compared at all (count or shapes differ)

    @property
    def ok(self) -> bool:
        return not self.problem and self.excess <= 0

    def describe(self) -> str:
        if self.problem:
            return self.problem
        verdict = "ok" if self.ok else f"BEYOND tolerance by {self.excess:.3g}"
        return f"largest difference {self.largest:.3g} ({verdict})"


def compare(outputs, reference) -> Difference:
    """Compare two lists of arrays (or two arrays) element by element."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    reference = reference if isinstance(reference, (list, tuple)) else [reference]
    if len(outputs) != len(reference):
        return Difference(math.inf, math.inf, f"{len(outputs)} outputs, the reference has {len(reference)}")
    largest, excess = 0.0, -math.inf
    for index, (actual, expected) in enumerate(zip(outputs, reference)):
        actual, expected = np.asarray(actual), np.asarray(expected)
        if actual.shape != expected.shape:
            return Difference(math.inf, math.inf,
                              f"output {index} has shape {actual.shape}, the reference {expected.shape}")
        largest = max(largest, float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0)))
        excess = max(excess, max_excess(actual, expected))
    return Difference(largest, excess)


def merge(differences) -> Difference:
    """The worst of several comparisons of the same pair."""
    differences = list(differences)
    problems = [d.problem for d in differences if d.problem]
    if problems:
        return Difference(math.inf, math.inf, problems[0])
    return Difference(max(d.largest for d in differences), max(d.excess for d in differences))


def onnx_runner(path):
    """An onnxruntime session on the CPU for ``path``: returns run(x) -> list of output arrays."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return session.run(None, {input_name: x})
        except Exception as exc:  # onnxruntime raises its own exception types; say which file and input
            raise InputError(f"{path}: onnxruntime cannot run an input of shape {x.shape}: "
                             f"{str(exc).strip().splitlines()[0]}; is this ONNX file exported from the same "
                             "model?") from None
    return run


def random_inputs(keras_model, spec) -> list[np.ndarray]:
    """Standard-normal inputs of the model's shape; a masked model gets padded steps, so masking counts."""
    fixed_batch, fixed_steps = keras_model.inputs[0].shape[0], keras_model.inputs[0].shape[1]
    rng = np.random.default_rng(0)
    # A 'valid' convolution or pooling window needs a minimum length.
    return [sample_input(spec, fixed_batch or batch, fixed_steps or max(steps, frontends.min_steps(spec)), rng)
            for batch, steps in DRAWS]


def _engine(spec, bundle_path):
    """The engine run to compare: the given bundle, or the spec read from the model, in memory."""
    import gru_engine
    from gru_engine.runtime import Model

    if bundle_path is None:
        return Model(spec), "engine (in memory)"
    # The random-input comparison below is a stronger check than the stored self-check, and a
    # failure is reported as a difference rather than raised.
    model = gru_engine.load(bundle_path, verify=False)
    if model.input_features != spec.input_features:
        raise InputError(f"{bundle_path}: the bundle takes {model.input_features} features per step, the Keras "
                         f"model {spec.input_features}; they are not the same model")
    return model, f"engine ({bundle_path})"


def verify(model_path, bundle_path=None, onnx_path=None) -> int:
    """Print the largest differences to Keras; return 0 if all agree within tolerance, else 1."""
    from gru_engine.exporters.keras_reader import keras_outputs, load_keras, read_keras

    keras_model = load_keras(model_path)
    spec = read_keras(keras_model)
    inputs = random_inputs(keras_model, spec)
    references = [keras_outputs(keras_model, x) for x in inputs]
    engine, engine_name = _engine(spec, bundle_path)
    candidates = [(engine_name, engine.predict_raw)]
    if onnx_path is not None:
        candidates.append((f"onnxruntime ({onnx_path})", onnx_runner(onnx_path)))

    shapes = ", ".join(str(x.shape) for x in inputs)
    print(f"verify {model_path}: random inputs of shape {shapes}; tolerance |d| <= {PARITY_ATOL:g} + "
          f"{PARITY_RTOL:g} * |keras|")
    failures = 0
    for name, run in candidates:
        difference = merge(compare(run(x), reference) for x, reference in zip(inputs, references))
        failures += not difference.ok
        print(f"  {name} vs keras: {difference.describe()}")
    print("all agree within tolerance" if not failures else f"FAILED: {failures} of {len(candidates)} disagree")
    return 0 if not failures else 1
