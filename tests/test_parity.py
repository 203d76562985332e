"""Parity: the engine against real Keras and against the float64 NumPy reference (tests/reference.py).

Every comparison uses the project's float32 tolerance, ``max_excess <= 0`` (|a - b| <= 1e-5 + 1e-4 |b|).
Keras runs through the benchmark registry's ``keras-call`` and the engine through its ``engine``
implementation (bundle written, loaded with its self-check), so one registry drives both the
parity tests and the benchmarks. Inputs never have the self-check's (batch, time).

Float32 parity only means something where float32 rounding cannot itself move the output by the
tolerance. A GRU whose recurrence expands (recurrent activation tanh, so 1 - z reaches 2; or large
recurrent weights) amplifies rounding exponentially with time: on the matrix's tanh/tanh GRU, Keras's
own float32 output is 3e-6 from float64 after 5 steps and 5.4 (of values near 8) after 40. So each
input is first shortened (halved) until ``reference.rounding_sensitivity`` says rounding moves the
float64 output by at most a tenth of the tolerance; on the matrix this leaves every tanh-free case
at full length.
"""

from __future__ import annotations

import dataclasses
import functools

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gru_engine
from gru_engine import UnsupportedModelError
from gru_engine.bench.registry import IMPLEMENTATIONS, Subject
from gru_engine.exporters import keras_reader
from gru_engine.spec import max_excess
from models import AIRLINE, FAMILY_MATRIX, PARITY_MATRIX, build_model, random_input, stateful, uses_masking
from reference import reference_predict, reference_run, rounding_sensitivity

MAX_SENSITIVITY = 0.1
THREADS = numba.config.NUMBA_NUM_THREADS
# Cycled through the cases so batch 1, the parallel path (batch >= 8) and long sequences all appear.
BATCHES = (1, 3, 17, 5, 9)
TIMES = (11, 1, 30, 4, 23, 60)


@dataclasses.dataclass(frozen=True)
class Case:
    layers: list
    features: int = 3
    steps: int | None = None  # fixed time axis in the Keras Input
    time: int | None = None   # input time, when the case needs a particular one
    batch: int | None = None  # input batch, when the case needs a particular one
    fixed_batch: bool = False  # build the Keras Input with that batch (stateful layers need one)
    seed: int | None = None   # weights; by default the name's length
    # Keras models to build: the GRU matrix runs both; the families' options are the same code in
    # the reader, so one build each keeps the test time down.
    builds: tuple[str, ...] = ("sequential", "functional")


def _gru(units, **options):
    return {"kind": "gru", "units": units, **options}


# Gaps the shared matrix leaves: feature counts, stacks, long sequences, layer orders, mask corner cases.
EXTRA = {
    "airline-fixed-10": Case(AIRLINE, features=1, steps=10, time=10, batch=7),
    "features-1-units-2": Case([_gru(2)], features=1),
    "features-8-stacked-3": Case([_gru(16, return_sequences=True), _gru(12, return_sequences=True, reset_after=False),
                                  _gru(8), {"kind": "dense", "units": 2}], features=8),
    # Seed 0 draws weights whose recurrence stays well conditioned over 200 steps (others can expand).
    "long-200-batch-17": Case([_gru(33, return_sequences=True), {"kind": "dense", "units": 1}],
                              features=2, time=200, batch=17, seed=0),
    "units-64-features-8-backwards": Case([_gru(64, go_backwards=True, use_bias=False)], features=8),
    "dense-first": Case([{"kind": "dense", "units": 5, "activation": "relu"}, _gru(6)], features=4),
    "dropout-first": Case([{"kind": "dropout", "rate": 0.3}, _gru(6, return_sequences=True, reset_after=False)]),
    "masking-dense-gru": Case([{"kind": "masking", "mask_value": 0.5}, {"kind": "dense", "units": 4},
                               _gru(5, return_sequences=True)], features=2),
    "masking-value-not-binary": Case([{"kind": "masking", "mask_value": 0.1}, _gru(5)], features=2),
    "masking-zero-output": Case([{"kind": "masking", "mask_value": 0.0},
                                 _gru(5, return_sequences=True, zero_output_for_mask=True),
                                 _gru(3, go_backwards=True)]),
    "masking-zero-output-last-step": Case([{"kind": "masking", "mask_value": 0.0},
                                           _gru(5, zero_output_for_mask=True)]),
    "masking-backwards-stacked": Case([{"kind": "masking", "mask_value": 0.0},
                                       _gru(5, go_backwards=True, return_sequences=True),
                                       _gru(4, return_sequences=True, return_state=True)]),
    "masking-bidirectional-state": Case([{"kind": "masking", "mask_value": -1.0},
                                         {"kind": "bidirectional", "units": 4, "reset_after": False,
                                          "return_sequences": True, "return_state": True}]),
    "bidirectional-none-sequences": Case([{"kind": "bidirectional", "units": 4, "merge_mode": None,
                                           "return_sequences": True}]),
    "bidirectional-none-state": Case([{"kind": "bidirectional", "units": 3, "merge_mode": None,
                                       "return_state": True}]),
    "stateful-fixed-batch": Case([_gru(6, stateful=True, return_sequences=True), _gru(4, stateful=True)],
                                 batch=4, fixed_batch=True),
    "stateful-bidirectional": Case([{"kind": "bidirectional", "units": 3, "stateful": True, "merge_mode": "sum"}],
                                   batch=3, fixed_batch=True),
    "lstm-airline-fixed-10": Case([{"kind": "lstm", "units": 50, "return_sequences": True}, {"kind": "lstm", "units": 50},
                                   {"kind": "dense", "units": 1}], features=1, steps=10, time=10, batch=7,
                                  builds=("sequential",)),
    "lstm-long-200-batch-17": Case([{"kind": "lstm", "units": 33, "return_sequences": True},
                                    {"kind": "dense", "units": 1}], features=2, time=200, batch=17, seed=0,
                                   builds=("sequential",)),
    "stateful-lstm-simple_rnn": Case(stateful([{"kind": "lstm", "units": 6, "return_sequences": True},
                                               {"kind": "simple_rnn", "units": 4}]),
                                     batch=4, fixed_batch=True, builds=("sequential",)),
    "stateful-bidirectional-lstm": Case([{"kind": "bidirectional", "layer": "lstm", "units": 3, "stateful": True,
                                          "merge_mode": "ave"}], batch=3, fixed_batch=True, builds=("functional",)),
}


def forced_functional(layers) -> bool:
    """build_model makes these functional whatever is asked: Sequential cannot end in several outputs."""
    return any(spec.get("return_state") or spec.get("merge_mode", "x") is None for spec in layers)


CASES = {name: Case(layers, features=1 if name == "airline" else 3) for name, layers in PARITY_MATRIX.items()}
CASES.update({name: Case(layers, builds=("functional",) if forced_functional(layers) else ("sequential",))
              for name, layers in FAMILY_MATRIX.items()})
CASES.update(EXTRA)



def parity_params():
    params = []
    for index, (name, case) in enumerate(CASES.items()):
        builds = ("functional",) if forced_functional(case.layers) else case.builds
        for build in builds:
            params.append(pytest.param(name, build, index, id=f"{name}-{build}"))
    return params


def case_input(case: Case, index: int) -> np.ndarray:
    """A (batch, time, features) input unlike the self-check's (2, 7); padded when the model masks."""
    batch = case.batch or BATCHES[index % len(BATCHES)]
    time = case.time or TIMES[index % len(TIMES)]
    mask_value = uses_masking(case.layers)
    x = random_input(batch, time, case.features, seed=100 + index, mask_value=mask_value)
    if mask_value is not None:
        # Corner cases: a masked first step, and a sample that is padding from end to end.
        x[0, 0] = mask_value
        if batch > 1:
            x[-1] = mask_value
    return x


def well_conditioned(spec, x: np.ndarray) -> np.ndarray:
    """x cut to its first half, quarter, ... until float32 rounding cannot matter (see the module doc)."""
    while x.shape[1] > 1 and rounding_sensitivity(spec, x) > MAX_SENSITIVITY:
        x = x[:, :x.shape[1] // 2]
    return x


def assert_parity(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}: output {index} has shape {a.shape}, expected {e.shape}"
        excess = max_excess(a, e)
        assert excess <= 0, (f"{what}: output {index} differs by up to {np.max(np.abs(a - e)):.3g}, "
                             f"{excess:.3g} beyond the parity tolerance")


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Case name and build -> Subject, each Keras model built once per module."""
    workdir = tmp_path_factory.mktemp("parity")

    @functools.cache
    def make(name: str, build: str) -> Subject:
        case = CASES[name]
        seed = len(name) if case.seed is None else case.seed
        model = build_model(case.layers, case.features, seed=seed, steps=case.steps,
                            batch=case.batch if case.fixed_batch else None,
                            functional=build == "functional")
        return Subject(model, name=f"{name}-{build}", workdir=workdir)
    return make


def keras_run(subject: Subject):
    """The registry's keras-call, started from zero state each time (stateful models keep carries)."""
    run = IMPLEMENTATIONS["keras-call"].prepare(subject, THREADS)

    def from_zero_state(x):
        keras_reader.reset_states(subject.keras_model)
        return run(x)
    return from_zero_state


@pytest.mark.parametrize("name, build, index", parity_params())
def test_engine_matches_keras_and_reference(subjects, name, build, index):
    subject = subjects(name, build)
    case = CASES[name]
    x = well_conditioned(subject.spec, case_input(case, index))
    assert case.time is None or x.shape[1] == case.time, "a case chosen for its length must keep it"
    assert x.shape[:2] != subject.spec.self_check_input.shape[:2]
    keras_outputs = keras_run(subject)(x)
    engine_outputs = IMPLEMENTATIONS["engine"].prepare(subject, THREADS)(x)
    reference_outputs = reference_predict(subject.spec, x)
    # The reference must itself agree with Keras, or it proves nothing about the engine.
    assert_parity(keras_outputs, reference_outputs, "keras vs reference")
    assert_parity(engine_outputs, keras_outputs, "engine vs keras")
    assert_parity(engine_outputs, reference_outputs, "engine vs reference")


@pytest.mark.parametrize("name", ["stateful-fixed-batch", "airline", "stateful-lstm-simple_rnn",
                                  "mixed-lstm-gru-dense"])
def test_carried_state_matches_stateful_keras(tmp_path, name):
    """Two consecutive chunks: stateful Keras carries its state; the engine's stream and
    predict(initial_state=...) must carry the same one."""
    case = CASES[name]
    batch = case.batch or 4
    keras_model = build_model(stateful(case.layers), case.features, seed=3, batch=batch)
    subject = Subject(keras_model, name=f"stateful-{name}", workdir=tmp_path)
    run_engine = IMPLEMENTATIONS["engine"].prepare(subject, THREADS)
    engine = gru_engine.load(subject.bundle_path)
    stream = engine.stream(batch=batch)
    chunks = [random_input(batch, 6, case.features, seed=7), random_input(batch, 9, case.features, seed=8)]

    keras_reader.reset_states(keras_model)
    reference_carries = None
    for chunk in chunks:
        expected = np.asarray(keras_model(chunk, training=False))
        reference, next_carries = reference_run(subject.spec, chunk, initial_state=reference_carries)
        assert_parity([expected], reference, "keras vs reference")
        streamed = stream.run(chunk)  # (B, T, D): every step's output
        last = streamed if engine.shapes[-1].output_is_sequence else streamed[:, -1]
        assert_parity([last], [expected], "stream vs stateful keras")
        from_state = engine.predict(chunk, initial_state=reference_carries)
        assert_parity([from_state], [expected], "predict(initial_state) vs stateful keras")
        reference_carries = next_carries
    assert_parity(stream.state, reference_carries, "stream carries vs reference carries")
    keras_reader.reset_states(keras_model)
    assert_parity(run_engine(chunks[0]), [np.asarray(keras_model(chunks[0]))], "engine vs keras after reset")


@st.composite
def configurations(draw):
    """A random valid chain: optional masking, 1-3 recurrent layers, each optionally followed by a dense
    layer; only the last may return states or (Bidirectional) leave its two directions unmerged."""
    features = draw(st.integers(1, 8))
    layers = []
    if draw(st.booleans()):
        layers.append({"kind": "masking", "mask_value": draw(st.sampled_from([0.0, -1.0]))})
    recurrent = draw(st.integers(1, 3))
    for position in range(recurrent):
        last = position == recurrent - 1
        layer = {
            "units": draw(st.integers(1, 64)),
            "activation": draw(st.sampled_from(["tanh", "sigmoid", "hard_sigmoid", "relu", "linear"])),
            "recurrent_activation": draw(st.sampled_from(["sigmoid", "hard_sigmoid", "tanh"])),
            "use_bias": draw(st.booleans()),
            "reset_after": draw(st.booleans()),
            "return_sequences": draw(st.booleans()) if last else True,
        }
        if draw(st.booleans()):
            merge_modes = ["concat", "sum", "mul", "ave"] + ([None] if last else [])
            layer.update(kind="bidirectional", merge_mode=draw(st.sampled_from(merge_modes)))
        else:
            layer.update(kind="gru", go_backwards=draw(st.booleans()), zero_output_for_mask=draw(st.booleans()))
        ends_chain = last and (layer.get("merge_mode", "") is None or draw(st.booleans()))
        if ends_chain:
            layer["return_state"] = draw(st.booleans())
        layers.append(layer)
        if not ends_chain and draw(st.booleans()):
            layers.append({"kind": "dense", "units": draw(st.integers(1, 16)),
                           "activation": draw(st.sampled_from(["linear", "relu", "sigmoid", "tanh", "softmax"]))})
    batch = draw(st.integers(1, 17))
    time = draw(st.integers(1, 200))
    return layers, features, batch, time, draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configuration=configurations())
def test_random_configurations(tmp_path_factory, configuration):
    layers, features, batch, time, seed, functional = configuration
    keras_model = build_model(layers, features, seed=seed, functional=functional)
    subject = Subject(keras_model, name="drawn", workdir=tmp_path_factory.mktemp("drawn"))
    # The bundle's self-check replays Keras's float32 output: only meaningful on a conditioned model.
    assume(rounding_sensitivity(subject.spec, subject.spec.self_check_input) <= MAX_SENSITIVITY)
    x = random_input(batch, time, features, seed=seed, mask_value=uses_masking(layers))
    x = well_conditioned(subject.spec, x)
    if x.shape[:2] == subject.spec.self_check_input.shape[:2]:
        x = x[:, :-1] if x.shape[1] > 1 else np.concatenate([x, x])
    keras_outputs = keras_run(subject)(x)
    engine_outputs = IMPLEMENTATIONS["engine"].prepare(subject, THREADS)(x)
    reference_outputs = reference_predict(subject.spec, x)
    assert_parity(keras_outputs, reference_outputs, f"keras vs reference for {layers}")
    assert_parity(engine_outputs, keras_outputs, f"engine vs keras for {layers}")
    assert_parity(engine_outputs, reference_outputs, f"engine vs reference for {layers}")


def _sequential(*layers, features=3):
    import keras
    return keras.Sequential([keras.Input((None, features)), *layers])


def _functional_branches():
    import keras
    inputs = keras.Input((None, 3))
    left = keras.layers.GRU(4, name="left")(inputs)
    right = keras.layers.GRU(4, name="right")(inputs)
    return keras.Model(inputs, keras.layers.Add(name="merge")([left, right]))


def _functional_shared():
    import keras
    inputs = keras.Input((None, 3))
    shared = keras.layers.GRU(3, return_sequences=True, name="shared_gru")
    return keras.Model(inputs, shared(shared(inputs)))


def _functional_state_in_middle():
    import keras
    inputs = keras.Input((None, 3))
    sequence, _ = keras.layers.GRU(3, return_sequences=True, return_state=True, name="middle_gru")(inputs)
    return keras.Model(inputs, keras.layers.GRU(2, name="last_gru")(sequence))


def _doubled(x):
    return 2.0 * x


def _peephole_lstm():
    """A user's LSTM subclass: it may compute anything, so it is refused, not read as an LSTM."""
    class PeepholeLSTM(_layers().LSTM):
        pass
    return PeepholeLSTM


def _layers():
    import keras
    return keras.layers


UNSUPPORTED = {
    "lstm-subclass": (lambda: _sequential(_peephole_lstm()(4, name="peephole_lstm")), "peephole_lstm"),
    "lstm-softmax": (lambda: _sequential(_layers().LSTM(4, activation="softmax", name="softmax_lstm")),
                     "softmax_lstm"),
    "simple_rnn-gelu": (lambda: _sequential(_layers().SimpleRNN(4, activation="gelu", name="gelu_rnn")), "gelu_rnn"),
    "conv1d-transpose": (lambda: _sequential(_layers().Conv1DTranspose(4, 2, name="my_conv"), _layers().GRU(2)),
                         "my_conv"),
    "bidirectional-mixed": (lambda: _sequential(_layers().Bidirectional(
        _layers().LSTM(3), backward_layer=_layers().GRU(3, go_backwards=True), name="mixed_bi")), "mixed_bi"),
    "branches": (_functional_branches, "right"),
    "shared-layer": (_functional_shared, "shared_gru"),
    "return-state-in-middle": (_functional_state_in_middle, "middle_gru"),
    "custom-activation": (lambda: _sequential(_layers().GRU(4, activation=_doubled, name="custom_gru")),
                          "custom_gru"),
    "gru-softmax": (lambda: _sequential(_layers().GRU(4, activation="softmax", name="softmax_gru")),
                    "softmax_gru"),
    "gru-recurrent-relu6": (lambda: _sequential(_layers().GRU(4, recurrent_activation="relu6", name="relu6_gru")),
                            "relu6_gru"),
    "dense-gelu": (lambda: _sequential(_layers().GRU(4), _layers().Dense(2, activation="gelu", name="gelu_dense")),
                   "gelu_dense"),
    "time-distributed": (lambda: _sequential(_layers().GRU(4, return_sequences=True),
                                             _layers().TimeDistributed(_layers().Dense(2), name="td")), "td"),
    "float16-policy": (lambda: _sequential(_layers().GRU(3, dtype="mixed_float16", name="half_gru")), "half_gru"),
    "masking-nan": (lambda: _sequential(_layers().Masking(float("nan"), name="nan_mask"), _layers().GRU(2)),
                    "nan_mask"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_keras_models_are_refused_naming_the_layer(name, tmp_path):
    make, layer_name = UNSUPPORTED[name]
    model = make()
    with pytest.raises(UnsupportedModelError, match=f"'{layer_name}'"):
        keras_reader.read_keras(model)
    with pytest.raises(UnsupportedModelError):
        keras_reader.export_bundle(model, tmp_path / "refused.gru.safetensors")
    assert not list(tmp_path.iterdir()), "a refused export must not leave a file"


def test_models_that_are_not_a_sequence_chain_are_refused():
    import keras
    first, second = keras.Input((None, 3)), keras.Input((None, 3))
    two_inputs = keras.Model([first, second], keras.layers.GRU(2)(keras.layers.Concatenate()([first, second])))
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        keras_reader.read_keras(two_inputs)
    with pytest.raises(UnsupportedModelError, match=r"\(batch, time, features\)"):
        keras_reader.read_keras(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    with pytest.raises(UnsupportedModelError, match="no recurrent layer"):
        keras_reader.read_keras(_sequential(keras.layers.Dense(2)))


def test_export_refuses_a_model_the_engine_does_not_reproduce(tmp_path, monkeypatch):
    """export_bundle replays the self-check before writing: a disagreement is refused, no file written."""
    real_outputs = keras_reader.keras_outputs

    def drifted(model, x):  # stands in for an engine/Keras mismatch
        return [output + np.float32(0.01) for output in real_outputs(model, x)]
    monkeypatch.setattr(keras_reader, "keras_outputs", drifted)
    model = build_model([{"kind": "gru", "units": 3}], 2)
    with pytest.raises(UnsupportedModelError, match="self-check failed"):
        keras_reader.export_bundle(model, tmp_path / "drifted.gru.safetensors")
    assert list(tmp_path.iterdir()) == []
