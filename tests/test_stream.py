"""Streaming: stepping equals predict on every prefix, chunks equal one call, state round-trips."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gru_engine
from gru_engine.spec import max_excess, recurrent_configs
from models import FAMILY_MATRIX, PARITY_MATRIX, build_model, is_causal, random_input, stateful, unaligned, uses_masking

MATRIX = {**PARITY_MATRIX, **FAMILY_MATRIX}
# GRU options are many variants of one kernel: a selection; every streamable LSTM, SimpleRNN and mixed chain.
CAUSAL_CASES = ["airline", "act-tanh-rec-hard_sigmoid", "act-relu-rec-sigmoid",
                "reset_after-False-bias-True-back-False", "reset_after-True-bias-False-back-False",
                "return-state-sequences", "masking", "masking-sequences-dense", "dense-softmax", "units-1"] + [
                    name for name, layers in FAMILY_MATRIX.items() if is_causal(layers)]
FEATURES = 3


@functools.cache
def engine_model(case: str, keep_state: bool = False):
    """(Keras model, engine Model) for a case; bundle written to a private temp dir."""
    import tempfile

    from gru_engine.exporters import export_bundle
    layers = stateful(MATRIX[case]) if keep_state else MATRIX[case]
    features = 1 if case == "airline" else FEATURES
    keras_model = build_model(layers, features, seed=3, batch=2 if keep_state else None)
    path = Path(tempfile.mkdtemp()) / f"{case}.gru.safetensors"
    export_bundle(keras_model, path)
    return keras_model, gru_engine.load(path)


def main_output(outputs):
    return outputs[0] if isinstance(outputs, list) else outputs


def case_input(case, batch, steps, seed):
    model = engine_model(case)[1]
    return random_input(batch, steps, model.input_features, seed=seed, mask_value=uses_masking(MATRIX[case]))


@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_step_equals_predict_on_every_prefix(case):
    assert is_causal(MATRIX[case])
    _, model = engine_model(case)
    x = case_input(case, 3, 12, seed=5)
    stream = model.stream(batch=3)
    sequence_output = model.shapes[-1].output_is_sequence
    for t in range(x.shape[1]):
        y = stream.step(x[:, t])
        expected = main_output(model.predict(x[:, :t + 1]))
        expected = expected[:, t] if sequence_output else expected
        assert max_excess(y, expected) <= 0, f"step {t}"
    assert stream.steps == x.shape[1]


@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_chunked_run_equals_one_predict(case):
    _, model = engine_model(case)
    x = case_input(case, 2, 17, seed=6)
    stream = model.stream(batch=2)
    chunks = [stream.run(x[:, a:b]) for a, b in ((0, 5), (5, 6), (6, 17))]
    per_step = np.concatenate(chunks, axis=1)                       # (B, T, D)
    expected = main_output(model.predict(x))
    if model.shapes[-1].output_is_sequence:
        assert max_excess(per_step, expected) <= 0
    else:
        assert max_excess(per_step[:, -1], expected) <= 0
        assert max_excess(per_step[:, 8], main_output(model.predict(x[:, :9]))) <= 0


@pytest.mark.parametrize("case", ["airline", "masking", "reset_after-False-bias-True-back-False", "lstm-masking",
                                  "mixed-lstm-gru-dense"])
def test_state_round_trip_and_initial_state(case):
    _, model = engine_model(case)
    x = case_input(case, 2, 14, seed=7)
    uninterrupted = model.stream(batch=2).run(x)
    stream = model.stream(batch=2)
    stream.run(x[:, :6])
    saved = stream.state
    assert [s.shape for s in saved] == [(2, units) for units in model.state_shapes]
    stream.reset()
    assert stream.steps == 0 and all(not s.any() for s in stream.state)
    stream.state = saved
    resumed = stream.run(x[:, 6:])
    assert max_excess(resumed, uninterrupted[:, 6:]) <= 0
    # predict with initial_state continues from the carries exactly like the stream does.
    continued = main_output(model.predict(x[:, 6:], initial_state=saved))
    expected = uninterrupted[:, 6:] if model.shapes[-1].output_is_sequence else uninterrupted[:, -1]
    assert max_excess(continued, expected) <= 0


@pytest.mark.parametrize("case", ["airline", "dense-tanh", "masking-sequences-dense", "mixed-lstm-gru-dense",
                                  "simple_rnn-masking"])
def test_keras_stateful_model_fed_the_same_chunks(case):
    """Keras stateful chunks == predict(chunk, initial_state=carries so far), and, without masking,
    == the stream's run. (With masking, Keras emits zeros at masked steps that open a chunk; a stream
    emits the carry there, so that every step equals predict on the whole prefix.)"""
    keras_model, model = engine_model(case, keep_state=True)
    assert all(config["stateful"] for layer in model.spec.layers for config in recurrent_configs(layer))
    x = case_input(case, 2, 15, seed=8)
    x[1, 4] = x[0, 9] = uses_masking(MATRIX[case]) or 0.0  # chunks opening on a padded step
    for layer in keras_model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    stream = model.stream(batch=2)
    for a, b in ((0, 4), (4, 5), (5, 9), (9, 15)):
        keras_y = np.asarray(keras_model(x[:, a:b], training=False))
        assert max_excess(main_output(model.predict(x[:, a:b], initial_state=stream.state)), keras_y) <= 0
        streamed = stream.run(x[:, a:b])
        if uses_masking(MATRIX[case]) is None:
            streamed = streamed if model.shapes[-1].output_is_sequence else streamed[:, -1]
            assert max_excess(streamed, keras_y) <= 0, f"chunk {a}:{b}"


@pytest.mark.parametrize("case", ["lstm-return-state", "mixed-simple_rnn-dense-lstm-gru"])
def test_stream_state_is_every_carry_in_keras_order(case):
    """LSTM: h then c, per direction, in layer order: what Keras's return_state and initial_state use."""
    _, model = engine_model(case)
    x = case_input(case, 2, 9, seed=9)
    stream = model.stream(batch=2)
    stream.run(x)
    state = stream.state
    kinds = [layer.kind for layer in model.spec.layers if recurrent_configs(layer)]
    assert len(state) == sum(2 if kind == "lstm" else 1 for kind in kinds) == len(model.state_shapes)
    if case == "lstm-return-state":
        _, h, c = model.predict(x)
        np.testing.assert_array_equal(state[0], h)
        np.testing.assert_array_equal(state[1], c)
        assert not np.allclose(h, c)
    # Every carry matters: changing any one of them changes what comes next.
    following = x[:, :3]
    expected = main_output(model.predict(following, initial_state=state))
    for index in range(len(state)):
        changed = [array.copy() for array in state]
        changed[index] += 0.5
        assert not np.allclose(main_output(model.predict(following, initial_state=changed)), expected), index
    stream.state = state
    assert max_excess(main_output(stream.run(following))[:, -1], expected if expected.ndim == 2
                      else expected[:, -1]) <= 0


def test_single_sample_step_shapes_and_out_buffer():
    _, model = engine_model("airline")
    stream = model.stream()
    y = stream.step(np.float32([0.3]))
    assert y.shape == (1,)
    out = np.empty(1, np.float32)
    assert stream.step(np.array([0.4]), out=out) is out
    assert max_excess(out, model.predict(np.float32([0.3, 0.4]).reshape(1, 2, 1))[0]) <= 0
    last = stream.step(np.array([[0.5]]))
    assert last.shape == (1, 1)
    assert max_excess(last, model.predict(np.float32([0.3, 0.4, 0.5]).reshape(1, 3, 1))) <= 0


def test_bad_steps_are_refused_and_leave_the_carry_untouched():
    _, model = engine_model("masking")
    stream = model.stream(batch=2)
    stream.step(np.ones((2, FEATURES)))
    before = stream.state
    bad_inputs = [np.ones((3, FEATURES)), np.ones((2, FEATURES + 1)), np.ones(FEATURES),
                  np.array([["a"] * FEATURES] * 2), np.full((2, FEATURES), np.nan),
                  np.array([[1.0, np.inf, 0.0], [0.0, 0.0, 1.0]])]
    for bad in bad_inputs:
        with pytest.raises(gru_engine.InputError):
            stream.step(bad)
    with pytest.raises(gru_engine.InputError):
        stream.run(np.ones((3, 2, FEATURES)))
    read_only = np.empty((2, 4), np.float32)
    read_only.flags.writeable = False
    for bad_out in (np.empty((2, 5), np.float32), np.empty((2, 4), np.int64), [[0.0] * 4] * 2, read_only):
        with pytest.raises(gru_engine.InputError, match="out must be"):
            stream.step(np.ones((2, FEATURES)), out=bad_out)
    with pytest.raises(gru_engine.InputError, match="cannot be read"):
        stream.step([[1.0, 2.0, 3.0], [1.0]])
    with pytest.raises(gru_engine.InputError):
        stream.state = [np.ones((2, 8))]
    with pytest.raises(gru_engine.InputError):
        stream.state = [np.full((2, 8), np.nan), np.ones((2, 4))]
    assert stream.steps == 1
    for kept, now in zip(before, stream.state):
        np.testing.assert_array_equal(kept, now)


def test_chunks_of_the_last_length_are_still_checked_and_agree_with_predict():
    """run keeps the call bound for the chunk length it saw last: chunks of that length that are bad,
    or need a copy first, are refused or copied all the same, with the carry untouched by a refusal."""
    _, model = engine_model("masking")
    x = case_input("masking", 2, 12, seed=4)                       # (2, 12, F)
    stream = model.stream(batch=2)
    outputs = [stream.run(np.ascontiguousarray(x[:, :4]))]
    before = stream.state
    chunk = np.ascontiguousarray(x[:, 4:8])                         # the length seen last
    nan_at_the_end = chunk.copy()
    nan_at_the_end[1, -1, 0] = np.nan
    read_only = np.empty(chunk.shape[:2] + (4,), np.float32)
    read_only.flags.writeable = False
    for bad, out in [(nan_at_the_end, None), (chunk.astype(str), None), (chunk[:1], None),
                     (np.ones((2, 4, FEATURES + 1), np.float32), None), (chunk, np.empty((2, 5, 4), np.float32)),
                     (chunk, np.empty((2, 4, 4))), (chunk, read_only)]:
        with pytest.raises(gru_engine.InputError):
            stream.run(bad, out=out)
    assert stream.steps == 4
    for kept, now in zip(before, stream.state):
        np.testing.assert_array_equal(kept, now)
    out = np.empty((2, 4, 4), np.float32)
    # Same length, but float64 and a view with gaps: both go through the full check and a copy.
    assert stream.run(x[:, 4:8].astype(np.float64), out=out) is out
    outputs += [out.copy(), stream.run(unaligned(x[:, 8:12]))]
    assert stream.steps == 12
    assert max_excess(np.concatenate(outputs, axis=1)[:, -1], main_output(model.predict(x))) <= 0


@pytest.mark.parametrize("case", ["reset_after-True-bias-True-back-True", "bidirectional-concat"])
def test_models_that_read_backwards_cannot_stream(case):
    _, model = engine_model(case)
    with pytest.raises(gru_engine.InputError, match="backwards.*cannot stream"):
        model.stream()


def test_a_chunk_too_long_for_scratch_is_refused_before_allocating():
    """A plain float32 chunk (the no-copy path) is still checked before its scratch is allocated."""
    _, model = engine_model("airline")
    stream = model.stream()
    long_chunk = np.zeros((1, 2**24, 1), np.float32)  # 64 MiB of input, ~13 GiB of scratch
    with pytest.raises(gru_engine.InputError, match="split it"):
        stream.run(long_chunk)
    with pytest.raises(gru_engine.InputError, match="split it"):
        model.predict(long_chunk)
    assert stream.steps == 0


def test_stream_batch_must_be_positive_int():
    _, model = engine_model("airline")
    for batch in (0, -1, 2.5, True, "3"):
        with pytest.raises(gru_engine.InputError):
            model.stream(batch=batch)


def test_cli_stream_answers_each_row_as_it_arrives(tmp_path):
    """Feed rows one by one through a pipe; each answer must come back before the next row is sent."""
    _, model = engine_model("airline")
    bundle = tmp_path / "airline.gru.safetensors"
    gru_engine.bundle.save(model.spec, bundle)
    rows = np.float32([0.2, 0.5, 0.1, 0.9])
    command = [sys.executable, "-m", "gru_engine.cli", "predict", str(bundle), "--stream", "--input", "-"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    answers = []
    try:
        process.stdin.write("passengers\n")
        for value in rows:
            process.stdin.write(f"{value}\n")
            process.stdin.flush()
            answers.append(float(process.stdout.readline()))
    finally:
        process.stdin.close()
        process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read()
    for t, answer in enumerate(answers):
        expected = model.predict(rows[:t + 1].reshape(1, t + 1, 1))[0, 0]
        assert abs(answer - expected) <= 1e-5 + 1e-4 * abs(expected)
