"""The Python API: every bad input is an InputError, harmless variations of a good input give the same
answer, the runtime never imports TensorFlow, summary() agrees with Keras, initial_state matches Keras."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gru_engine import InputError, Model, bundle
from gru_engine.spec import Layer, max_excess
from gru_engine.kernels import activations
from models import build_model, random_input
from reference import gru_config, random_spec, reference_predict

FEATURES = 3


@pytest.fixture(scope="module")
def model() -> Model:
    """Masking -> GRU(6, sequences) -> GRU(4) -> Dense(2): every kind of layer the checks pass through."""
    layers = [Layer("masking", "masking", {"mask_value": 0.0}),
              Layer("gru", "first", gru_config(6, return_sequences=True)),
              Layer("gru", "second", gru_config(4, reset_after=False)),
              Layer("dense", "dense", {"units": 2, "activation": "linear", "use_bias": True})]
    return Model(random_spec(layers, FEATURES, seed=4))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return random_input(5, 8, FEATURES, seed=2)  # (5, 8, 3) float32


def assert_close(actual, expected):
    assert max_excess(np.asarray(actual), np.asarray(expected)) <= 0


# --- bad inputs ---

@pytest.mark.parametrize("shape, message", [
    ((8, FEATURES), r"x\[None\]"),
    ((FEATURES,), "shape"),
    ((), "shape"),
    ((1, 2, 8, FEATURES), "shape"),
    ((2, 8, FEATURES + 1), f"{FEATURES + 1} features per time step; this model takes {FEATURES}"),
    ((2, 8, 1), "1 features"),
    ((0, 8, FEATURES), "at least 1"),
    ((2, 0, FEATURES), "at least 1"),
])
def test_wrong_shapes(model, shape, message):
    with pytest.raises(InputError, match=message):
        model.predict(np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", [object, np.complex64, np.complex128, "U3", "S3", "datetime64[s]", "V4"])
def test_non_numeric_dtypes(model, dtype):
    with pytest.raises(InputError, match="dtype"):
        model.predict(np.zeros((2, 3, FEATURES), dtype))


@pytest.mark.parametrize("value", [
    [[["a", "b", "c"]]],
    [[[1.0, 2.0, 3.0], [1.0, 2.0]]],   # ragged
    None,
    "hello",
    {"x": 1},
])
def test_things_that_are_not_arrays(model, value):
    with pytest.raises(InputError):
        model.predict(value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_the_problem(model, x, bad):
    poisoned = x.copy()
    poisoned[3, 5, 1] = bad
    with pytest.raises(InputError, match="1 input sequence"):
        model.predict(poisoned)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float64_values_that_overflow_float32(model, x):
    with pytest.raises(InputError, match="NaN or infinite"):
        model.predict(x.astype(np.float64) * 1e300)


def test_initial_state_errors(model, x):
    good = [np.zeros((5, 6)), np.zeros((5, 4))]
    with pytest.raises(InputError, match="needs 2 arrays"):
        model.predict(x, initial_state=good[:1])
    with pytest.raises(InputError, match=r"initial_state\[1\]"):
        model.predict(x, initial_state=[good[0], np.zeros((5, 5))])
    with pytest.raises(InputError, match=r"initial_state\[0\]"):
        model.predict(x, initial_state=[np.full((5, 6), np.nan), good[1]])
    with pytest.raises(InputError, match=r"initial_state\[0\]"):
        model.predict(x, initial_state=[np.zeros((5, 6), object), good[1]])


def test_stream_input_errors(model):
    stream = model.stream(batch=2)
    for bad in (np.zeros(FEATURES), np.zeros((2, FEATURES + 1)), np.zeros((3, FEATURES)),
                np.zeros((2, FEATURES), complex), np.array([["a"] * FEATURES] * 2)):
        with pytest.raises(InputError):
            stream.step(bad)
    with pytest.raises(InputError, match="NaN or infinite"):
        stream.step(np.full((2, FEATURES), np.nan))
    assert stream.steps == 0 and not np.any(stream.state[0]), "a refused step must not move the stream"
    for batch in (0, -1, True, 2.5, 1 << 40):
        with pytest.raises(InputError, match="batch"):
            model.stream(batch=batch)


HUGE_INPUT = textwrap.dedent("""
    import resource, sys, tracemalloc
    limit = 1500 << 20  # an attempt to copy the 6 GiB input fails here instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_api import huge_input_model
    model = huge_input_model()
    x = np.broadcast_to(np.float32(0.5), {shape})  # no memory behind it
    tracemalloc.start()
    try:
        model.predict(x)
        print("accepted")
    except Exception as exc:
        print(type(exc).__name__, tracemalloc.get_traced_memory()[1], str(exc)[:300])
""")


def huge_input_model() -> Model:
    return Model(random_spec([Layer("gru", "gru", gru_config(4))], FEATURES, seed=1))


@pytest.mark.parametrize("shape", [(1, 2**29, FEATURES), (2**29, 1, FEATURES), (2**16, 2**16, FEATURES)])
def test_huge_inputs_are_refused_without_being_copied(tmp_path, shape):
    """A view with no memory behind it must be refused from its shape, not by running out of memory."""
    from pathlib import Path
    script = HUGE_INPUT.format(tests=str(Path(__file__).parent), shape=shape)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    kind, peak, message = result.stdout.strip().split(" ", 2)
    assert kind == "InputError", f"{kind}: {message}"
    assert int(peak) < 64 << 20, f"{int(peak) >> 20} MiB allocated before refusing"


# --- harmless variations ---

def test_integer_bool_and_float64_inputs_are_cast(model, x):
    expected = model.predict(x)
    assert_close(model.predict(x.astype(np.float64)), expected)
    assert_close(model.predict(x.tolist()), expected)
    integers = np.rint(x * 3).astype(np.int64)
    assert_close(model.predict(integers), model.predict(integers.astype(np.float32)))
    flags = x > 0
    assert_close(model.predict(flags), model.predict(flags.astype(np.float32)))
    assert_close(model.predict(x.astype(np.float16)), model.predict(x.astype(np.float16).astype(np.float32)))


def test_non_contiguous_inputs_give_the_same_result(model, x):
    expected = model.predict(x)
    transposed = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)  # (B, T, F), F-ordered
    assert not transposed.flags.c_contiguous
    assert_close(model.predict(transposed), expected)
    assert_close(model.predict(np.asfortranarray(x)), expected)
    wide = np.repeat(x, 2, axis=1)  # (B, 2T, F); every other step is the original
    assert_close(model.predict(wide[:, ::2]), expected)
    assert_close(model.predict(x[::-1].copy()[::-1]), expected)
    big_endian = x.astype(">f4")
    assert_close(model.predict(big_endian), expected)


def test_predict_does_not_modify_its_input(model, x):
    before = x.copy()
    model.predict(x)
    np.testing.assert_array_equal(x, before)


def test_results_are_fresh_arrays(model, x):
    first = model.predict(x)
    kept = first.copy()
    model.predict(x * 2)
    np.testing.assert_array_equal(first, kept)


def test_transforms_match_the_reference():
    """Affine scaling with an inverted output, then a log: the engine applies them as the reference does."""
    transforms = [
        {"kind": "log", "invert_output": False},
        {"kind": "affine", "scale": [0.5, 2.0], "offset": [0.1, -0.3], "output_scale": [4.0], "output_offset": [1.0]},
    ]
    layers = [Layer("gru", "gru", gru_config(5)), Layer("dense", "out", {"units": 1, "activation": "linear",
                                                                          "use_bias": True})]
    model = Model(random_spec(layers, 2, seed=9, transforms=transforms))
    x = np.abs(random_input(4, 6, 2, seed=3)) + 0.1
    assert_close(model.predict(x), reference_predict(model.spec, x)[0])
    assert_close(model.predict_raw(x), reference_predict(model.spec, x, transforms=False)[0])
    with pytest.raises(InputError, match="> 0"):
        model.predict(-x)


# --- the runtime stays free of TensorFlow and ONNX ---

def test_load_and_predict_never_import_tensorflow_or_onnx(tmp_path):
    path = bundle.save(random_spec([Layer("gru", "gru", gru_config(3))], 2), tmp_path / "m.gru.safetensors")
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import gru_engine
        model = gru_engine.load({str(path)!r})
        model.predict(np.ones((2, 4, 2), np.float32))
        stream = model.stream()
        stream.step(np.ones(2))
        heavy = ("tensorflow", "keras", "onnx", "onnxruntime", "tf2onnx", "jax", "torch", "dask", "distributed",
                 "zarr", "pyarrow")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


# --- agreement with Keras ---

SUMMARY_LAYERS = [{"kind": "masking", "mask_value": 0.0},
                  {"kind": "bidirectional", "units": 5, "return_sequences": True, "reset_after": False},
                  {"kind": "dropout", "rate": 0.2},
                  {"kind": "gru", "units": 4, "use_bias": False, "return_sequences": True},
                  {"kind": "dense", "units": 3, "activation": "softmax"},
                  {"kind": "lstm", "units": 3, "return_sequences": True},
                  {"kind": "bidirectional", "layer": "simple_rnn", "units": 2, "return_sequences": True},
                  {"kind": "simple_rnn", "units": 2, "use_bias": False, "return_sequences": True},
                  {"kind": "bidirectional", "layer": "lstm", "units": 2}]


def test_summary_names_layers_and_counts_parameters_like_keras():
    from gru_engine.exporters import read_keras

    keras_model = build_model(SUMMARY_LAYERS, FEATURES, seed=1)
    lines = []
    Model(read_keras(keras_model)).summary(print_fn=lines.append)
    text = "\n".join(lines)
    for layer in keras_model.layers:
        if type(layer).__name__ == "Dropout":
            assert layer.name not in text  # inference-time identity, not part of the chain
            continue
        row = next((line for line in text.splitlines() if line.startswith(layer.name + " ")), None)
        assert row is not None, f"layer {layer.name} missing from:\n{text}"
        assert row.split()[-1] == f"{layer.count_params():,}", row
    assert f"Total params: {keras_model.count_params():,}" in text


STATE_STACKS = {
    "gru": [{"kind": "masking", "mask_value": 0.0},
            {"kind": "gru", "units": 6, "return_sequences": True},
            {"kind": "bidirectional", "units": 3, "return_sequences": True, "reset_after": False},
            {"kind": "gru", "units": 4}, {"kind": "dense", "units": 2}],
    "lstm-simple_rnn": [{"kind": "masking", "mask_value": 0.0},
                        {"kind": "lstm", "units": 6, "return_sequences": True},
                        {"kind": "bidirectional", "layer": "lstm", "units": 3, "return_sequences": True},
                        {"kind": "simple_rnn", "units": 4, "return_sequences": True},
                        {"kind": "bidirectional", "layer": "simple_rnn", "units": 2, "merge_mode": "sum"},
                        {"kind": "dense", "units": 2}],
}


@pytest.fixture(scope="module", params=sorted(STATE_STACKS))
def keras_stack(request):
    layers = STATE_STACKS[request.param]
    from gru_engine.exporters import read_keras
    keras_model = build_model(layers, FEATURES, seed=6)
    return keras_model, Model(read_keras(keras_model))


def keras_with_initial_state(keras_model, x, states):
    """Keras's layers called one by one, each recurrent layer given its initial state(s): [h] per
    GRU or SimpleRNN, [h, c] per LSTM, forward's then backward's in a Bidirectional."""
    import keras
    pending = [keras.ops.convert_to_tensor(state) for state in states]
    mask = None
    values = keras.ops.convert_to_tensor(x)
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind == "Masking":
            mask = layer.compute_mask(values)
            values = layer(values)
        elif kind in ("GRU", "LSTM", "SimpleRNN", "Bidirectional"):
            inner = type(layer.forward_layer).__name__ if kind == "Bidirectional" else kind
            count = (2 if inner == "LSTM" else 1) * (2 if kind == "Bidirectional" else 1)
            states, pending = pending[:count], pending[count:]
            values = layer(values, initial_state=states, mask=mask)
            mask = mask if layer.return_sequences else None
        else:
            values = layer(values)
    return np.asarray(values)


def test_initial_state_matches_keras(keras_stack):
    keras_model, model = keras_stack
    x = random_input(4, 9, FEATURES, seed=11)  # no padded steps
    rng = np.random.default_rng(12)
    states = [rng.standard_normal((4, units)).astype(np.float32) for units in model.state_shapes]
    expected = keras_with_initial_state(keras_model, x, states)
    assert_close(model.predict(x, initial_state=states), expected)
    assert_close(reference_predict(model.spec, x, initial_state=states)[0], expected)
    assert max_excess(model.predict(x), expected) > 0, "the initial state must change the result"


def test_initial_state_with_masked_steps_matches_keras(keras_stack):
    """Keras outputs zeros for masked steps before the first kept one, whatever the initial state."""
    keras_model, model = keras_stack
    x = random_input(4, 9, FEATURES, seed=11, mask_value=0.0)
    x[0, :2] = 0.0   # padded first steps
    x[1] = 0.0       # nothing but padding
    rng = np.random.default_rng(13)
    states = [rng.standard_normal((4, units)).astype(np.float32) for units in model.state_shapes]
    expected = keras_with_initial_state(keras_model, x, states)
    assert_close(reference_predict(model.spec, x, initial_state=states)[0], expected)
    assert_close(model.predict(x, initial_state=states), expected)


def test_kernels_use_512_bit_vectors_where_the_cpu_has_them():
    """The per-kernel vector-width request reaches LLVM (it goes in through llvmlite's internals)."""
    import llvmlite.binding as llvm
    import numba
    from gru_engine.kernels import products
    from gru_engine._flags import KERNEL_FLAGS
    if "+avx512f" not in llvm.get_host_cpu_features().flatten():
        pytest.skip("this CPU has no AVX-512: the kernels keep 256-bit vectors")
    # A fresh compile of the kernel's own source: code loaded from the on-disk cache has no assembly to show.
    matvec = numba.njit(**dict(KERNEL_FLAGS, cache=False))(products.accumulate_matvec.py_func)
    v, matrix, acc = np.ones(8, np.float32), np.ones((8, 64), np.float32), np.zeros(64, np.float32)
    matvec(v, matrix, acc)
    assert acc[0] == 8.0
    assert "zmm" in matvec.inspect_asm(matvec.signatures[0])


@pytest.mark.parametrize("rows", [3, 5, 16, 50, 128])
@pytest.mark.parametrize("width", [16, 48, 144, 160, 208, 400, 768])
def test_one_sample_sums_exactly_as_in_a_block_of_four(rows, width):
    """A sample's products are the same floats whether it runs alone (a batch's last, partial block,
    or a stream of one) or in a block of four: both paths add the rows in the same order."""
    from gru_engine.kernels import products
    rng = np.random.default_rng(rows * 1000 + width)
    v = rng.standard_normal((4, rows)).astype(np.float32)
    matrix = rng.standard_normal((rows, width)).astype(np.float32)
    start = rng.standard_normal((4, width)).astype(np.float32)
    in_block = start.copy()
    products.accumulate_matvec4(v[0], v[1], v[2], v[3], matrix, in_block[0], in_block[1], in_block[2], in_block[3])
    alone = start.copy()
    for sample in range(4):
        products.accumulate_matvec(v[sample], matrix, alone[sample])
    assert np.array_equal(alone, in_block)


@pytest.mark.parametrize("code, exact", [
    (activations.TANH, np.tanh),
    (activations.SIGMOID, lambda x: 0.5 * (np.tanh(0.5 * x) + 1.0)),
])
def test_tanh_and_sigmoid_within_a_few_ulp_of_float64(code, exact):
    """The float32 activations stay within 1e-7 of float64 everywhere (TensorFlow's own tanh: 3.4e-7),
    and within 2 ulp near zero, where a recurrence reads small values (1 - e^-2|x| cancels there)."""
    x = np.concatenate([np.linspace(-40.0, 40.0, 400_001), np.geomspace(1e-30, 1.0, 20_001)])
    x = np.concatenate([x, -x]).astype(np.float32)
    y = x.copy()
    activations.activate(y, code)
    want = exact(x.astype(np.float64))
    error = np.abs(y - want)
    assert error.max() <= 1e-7
    if code == activations.TANH:
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert (error / ulp).max() <= 2.0
