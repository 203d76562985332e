"""A bundle's transforms in the compiled call: folded into the weights where exact, steps elsewhere.

Each case runs folded (the default), unfolded (every step in the kernel) and the NumPy reference,
and checks they agree both ways at the parity tolerance; then streams, ``out=`` and allocations.
"""

import tracemalloc

import numpy as np
import pytest

from gru_engine import InputError
from gru_engine.kernels.transforms import FIRST_STEP
from gru_engine.runtime import Model
from gru_engine.spec import Layer, max_excess
from models import unaligned
from reference import gru_config, random_spec, recurrent_config, reference_predict

FEATURES = 2


def affine(scale, offset, output_scale=None, output_offset=None):
    return {"kind": "affine", "scale": scale, "offset": offset, "output_scale": output_scale,
            "output_offset": output_offset}


def dense(units, activation="linear", use_bias=True, name="out"):
    return Layer("dense", name, {"units": units, "activation": activation, "use_bias": use_bias})


GRU = Layer("gru", "gru", gru_config(5))
GRU_SEQUENCES = Layer("gru", "gru", gru_config(5, return_sequences=True))
LOG = {"kind": "log", "invert_output": True}
SCALE = affine([0.5, 2.0], [0.1, -0.3], [4.0], [1.0])

# name: (layers, transforms, input positive, steps left unfolded)
CASES = {
    "tutorial-affine": ([GRU_SEQUENCES, Layer("gru", "gru2", gru_config(4)), dense(1)], [SCALE], False, 0),
    "input-only": ([GRU, dense(3, "tanh")], [affine([0.5, 2.0], [0.1, -0.3])], False, 0),
    "nonlinear-last": ([GRU, dense(1, "tanh")], [SCALE], False, 1),
    "no-bias-reset-before": ([Layer("gru", "gru", gru_config(5, use_bias=False, reset_after=False)), dense(1)],
                             [SCALE], False, 0),
    "bidirectional-first": ([Layer("bidirectional", "bi", {"merge_mode": "concat", "forward": gru_config(3),
                                                           "backward": gru_config(3, go_backwards=True)}),
                             dense(1, use_bias=False)], [SCALE], False, 0),
    "lstm-first": ([Layer("lstm", "lstm", recurrent_config("lstm", 4, use_bias=False)), dense(1)], [SCALE], False, 0),
    "simple-rnn-first": ([Layer("simple_rnn", "rnn", recurrent_config("simple_rnn", 4)), dense(1)], [SCALE],
                         False, 0),
    "bidirectional-lstm": ([Layer("bidirectional", "bi", {"layer": "lstm", "merge_mode": "sum",
                                                          "forward": recurrent_config("lstm", 3),
                                                          "backward": recurrent_config("lstm", 3, go_backwards=True)}),
                            dense(1)], [SCALE], False, 0),
    "dense-first": ([dense(4, "relu", name="first"), Layer("gru", "gru", gru_config(3, return_sequences=True)), dense(1)],
                    [SCALE], False, 0),
    "masking-first": ([Layer("masking", "mask", {"mask_value": 0.0}), GRU, dense(1)], [SCALE], False, 1),
    "gru-last": ([GRU], [affine([0.5, 2.0], [0.1, -0.3], [2.0] * 5, [0.5] * 5)], False, 1),
    "log-then-affine": ([GRU, dense(1)], [LOG, SCALE], True, 2),
    "affine-then-log": ([GRU, dense(1)], [SCALE, LOG], True, 4),
    "level": ([GRU_SEQUENCES, Layer("gru", "gru2", gru_config(4)), dense(1)],
              [LOG, {"kind": "center", "invert_output": True, "output_features": [1]}], True, 4),
    "center-then-affine": ([GRU_SEQUENCES, dense(2)],
                           [{"kind": "center", "invert_output": True, "output_features": [1, 0]},
                            affine([0.5, 2.0], [0.1, -0.3], [3.0, -2.0], [0.5, 0.25])], False, 2),
}


def case_spec(name):
    layers, transforms, _, _ = CASES[name]
    return random_spec(layers, FEATURES, seed=7, transforms=transforms)


def case_input(name, batch=6, steps=7):
    x = np.random.default_rng(3).standard_normal((batch, steps, FEATURES)).astype(np.float32)
    return np.abs(x) + 0.2 if CASES[name][2] else x


def kernel_steps(program) -> int:
    return int((program.plan[:, 0] >= FIRST_STEP).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_folded_and_unfolded_agree_with_each_other_and_the_reference(name):
    spec = case_spec(name)
    folded, unfolded = Model(spec), Model(spec, fold_transforms=False)
    assert kernel_steps(folded._program) == CASES[name][3]
    assert kernel_steps(unfolded._program) >= CASES[name][3]
    x = case_input(name)
    a, b = folded.predict(x), unfolded.predict(x)
    assert max_excess(a, b) <= 0 and max_excess(b, a) <= 0
    expected = reference_predict(spec, x)[0]
    assert max_excess(a, expected) <= 0 and max_excess(b, expected) <= 0


@pytest.mark.parametrize("name", ["tutorial-affine", "log-then-affine", "dense-first"])
def test_streams_with_transforms_match_predict_folded_or_not(name):
    spec = case_spec(name)
    x = case_input(name, batch=2, steps=5)
    for fold in (True, False):
        model = Model(spec, fold_transforms=fold)
        stream, chunked = model.stream(batch=2), model.stream(batch=2)
        steps = np.stack([stream.step(x[:, t]) for t in range(x.shape[1])], axis=1)  # (B, T, D)
        runs = np.concatenate([chunked.run(x[:, :2]), chunked.run(x[:, 2:])], axis=1)
        for t in range(x.shape[1]):
            expected = model.predict(x[:, :t + 1])
            expected = expected[:, -1] if expected.ndim == 3 else expected
            assert max_excess(steps[:, t], expected) <= 0 and max_excess(runs[:, t], expected) <= 0


def test_a_log_of_a_value_at_most_zero_is_refused_before_the_carry_moves():
    model = Model(case_spec("log-then-affine"))
    stream = model.stream(batch=6)  # two blocks of samples: the bad sample is in the second
    x = case_input("log-then-affine", batch=6, steps=3)
    stream.run(x)
    before = stream.state
    bad = x.copy()
    bad[5, 1, 0] = 0.0
    for call in (lambda: stream.run(bad), lambda: stream.step(bad[:, 1]), lambda: model.predict(bad)):
        with pytest.raises(InputError, match="> 0"):
            call()
    for kept, now in zip(before, stream.state):
        np.testing.assert_array_equal(kept, now)


def test_out_buffers_are_checked_and_written():
    model = Model(case_spec("tutorial-affine"))
    x = case_input("tutorial-affine", batch=3, steps=4)
    out = np.full((3, 1), np.nan, np.float32)
    assert model.predict(x, out=out) is out
    np.testing.assert_array_equal(out, model.predict(x))
    stream = model.stream(batch=3)
    chunk = np.empty((3, 4, 1), np.float32)
    assert stream.run(x, out=chunk) is chunk
    np.testing.assert_array_equal(chunk, model.stream(batch=3).run(x))
    read_only = np.empty((3, 1), np.float32)
    read_only.flags.writeable = False
    for bad in (np.empty((3, 2), np.float32), np.empty((3, 1)), np.empty((3, 2), np.float32)[:, :1], read_only,
                [[0.0]] * 3):
        with pytest.raises(InputError, match="out must be"):
            model.predict(x, out=bad)
    with pytest.raises(InputError, match="out must be"):
        stream.run(x, out=np.empty((3, 5, 1), np.float32))
    with pytest.raises(InputError, match="out must be"):
        stream.step(x[:, 0], out=np.empty((3, 1), np.float64))
    sequences = Model(random_spec([GRU_SEQUENCES], FEATURES, seed=1))
    out = np.empty((3, 4, 5), np.float32)
    assert sequences.predict(x, out=out) is out
    np.testing.assert_array_equal(out, sequences.predict(x))
    with_state = Model(random_spec([Layer("gru", "gru", gru_config(5, return_state=True))], FEATURES, seed=1))
    with pytest.raises(InputError, match="one output"):
        with_state.predict(x, out=np.empty((3, 5), np.float32))


def test_a_repeated_predict_call_still_honours_every_argument():
    """predict(x) shaped like the last call goes straight to the kernel call bound then, with out=
    or without; initial_state, lengths, a new shape and a bad input still take the full path."""
    model = Model(random_spec([GRU_SEQUENCES], FEATURES, seed=2))
    x = np.random.default_rng(2).standard_normal((3, 4, FEATURES)).astype(np.float32)
    out = np.empty((3, 4, 5), np.float32)
    expected = model.predict(x)
    assert model._scratch.bound[0] == x.shape  # the next call of this shape takes the bound path
    again = model.predict(x)
    assert again is not expected
    np.testing.assert_array_equal(again, expected)
    for _ in range(2):
        assert model.predict(x, out=out) is out
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(model.predict(unaligned(x), out=out), expected)  # copied first
    state = [np.full((3, 5), 0.5, np.float32)]
    np.testing.assert_array_equal(model.predict(x, initial_state=state, out=out), model.predict(x, initial_state=state))
    np.testing.assert_array_equal(model.predict(x, out=out), expected)  # from zero state again
    lengths = np.array([4, 2, 1])
    np.testing.assert_array_equal(model.predict(x, lengths=lengths, out=out), model.predict(x, lengths=lengths))
    longer = np.concatenate([x, x], axis=1)
    np.testing.assert_array_equal(model.predict(longer, out=np.empty((3, 8, 5), np.float32)), model.predict(longer))
    bad = x.copy()
    bad[1, 2, 0] = np.nan
    model.predict(x, out=out)
    kept = out.copy()
    with pytest.raises(InputError, match="NaN"):
        model.predict(bad, out=out)
    np.testing.assert_array_equal(out, kept)
    with pytest.raises(InputError, match="out must be"):
        model.predict(x, out=out[:, :2])


def allocated_bytes(call, repeats=50) -> int:
    """Peak bytes traced while ``call`` runs ``repeats`` times, after a first call (which may
    allocate scratch)."""
    call()
    tracemalloc.start()
    try:
        for _ in range(repeats):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["tutorial-affine", "log-then-affine", None])
def test_calls_with_out_allocate_nothing(name):
    spec = case_spec(name) if name else random_spec([GRU_SEQUENCES, dense(1)], FEATURES, seed=2)
    model = Model(spec)
    batch, steps = 512, 32
    x = case_input(name or "input-only", batch=batch, steps=steps)
    out = np.empty((batch, 1), np.float32) if name else np.empty((batch, steps, 1), np.float32)
    # Below the smallest array a call could make (one float32 per sample: 2 KiB), above the Python
    # objects it makes and frees (an array view, the dispatcher's boxes: a few hundred bytes).
    limit = 1024
    assert allocated_bytes(lambda: model.predict(x, out=out)) < limit
    stream = model.stream(batch=batch)
    stream.run(x, out=np.empty((batch, steps, 1), np.float32))
    x_short, short = np.ascontiguousarray(x[:, :8]), np.empty((batch, 8, 1), np.float32)
    # The scratch of the longest chunk so far serves shorter ones too.
    assert allocated_bytes(lambda: stream.run(x_short, out=short)) < limit
    x_t, y_t = np.ascontiguousarray(x[:, 0]), np.empty((batch, 1), np.float32)
    assert allocated_bytes(lambda: stream.step(x_t, out=y_t)) < limit
    assert allocated_bytes(lambda: stream.step(x_t)) > limit  # the measure sees an output array
