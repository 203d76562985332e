"""Threads: one Model shared by many threads gives the serial answers; one Stream shared by two threads
is serialised by its lock.

Concurrent predict runs in a subprocess per Numba threading layer: a layer that cannot take concurrent
parallel launches aborts the whole process, which must be a test failure, not a dead test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gru_engine import Model
from gru_engine.spec import Layer
from reference import gru_config, random_spec

CONCURRENT_PREDICT = """
import json, sys, threading
import numpy as np
sys.path.insert(0, {tests!r})
from test_threads import threaded_model, thread_inputs
model = threaded_model()
inputs = thread_inputs()
serial = [model.predict(x, initial_state=states) for x, states in inputs]
mismatches, errors = [], []
barrier = threading.Barrier(len(inputs))

def work(index):
    x, states = inputs[index]
    try:
        barrier.wait()
        for repeat in range(15):
            if not np.array_equal(model.predict(x, initial_state=states), serial[index]):
                mismatches.append(index)
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(index,)) for index in range(len(inputs))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
import numba
print(json.dumps({{"layer": numba.threading_layer(), "mismatches": mismatches, "errors": errors[:3]}}))
"""


def threaded_model() -> Model:
    layers = [Layer("masking", "masking", {"mask_value": 0.0}),
              Layer("gru", "gru", gru_config(12, return_sequences=True)),
              Layer("gru", "last", gru_config(5, reset_after=False))]
    return Model(random_spec(layers, 3, seed=3))


def thread_inputs():
    """Eight (x, initial_state) pairs: batches on both sides of the parallel threshold, various lengths."""
    rng = np.random.default_rng(0)
    inputs = []
    for batch, steps in [(1, 40), (3, 7), (8, 25), (16, 30), (17, 5), (9, 60), (2, 1), (32, 12)]:
        x = rng.standard_normal((batch, steps, 3)).astype(np.float32)
        x[0, steps // 2] = 0.0  # a masked step
        states = [rng.standard_normal((batch, units)).astype(np.float32) for units in (12, 5)]
        inputs.append((x, states))
    return inputs


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_many_threads_on_one_model_match_serial_calls(layer):
    environment = dict(os.environ)
    if layer != "default":
        environment["NUMBA_THREADING_LAYER"] = layer
    script = CONCURRENT_PREDICT.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-1500:]}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["errors"] == [] and report["mismatches"] == [], report


@pytest.fixture()
def fast_thread_switching():
    """Switch threads every microsecond, so a missing lock shows up within a few dozen steps
    (without the Stream's lock this test then fails 4 times in 5)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("batch", [2, 16])
def test_one_stream_stepped_from_two_threads_is_serialised(fast_thread_switching, batch):
    """Both threads feed the same x_t, so whatever the interleaving, the k-th step's output is the
    serial k-th output: the union of both threads' outputs must be exactly the serial outputs."""
    model = threaded_model()
    x_t = np.random.default_rng(1).standard_normal((batch, 3)).astype(np.float32)
    steps_per_thread = 60
    serial_stream = model.stream(batch=batch)
    serial = [serial_stream.step(x_t) for _ in range(2 * steps_per_thread)]

    shared = model.stream(batch=batch)
    seen: list[list[np.ndarray]] = [[], []]
    barrier = threading.Barrier(2)

    def work(index):
        barrier.wait()
        for _ in range(steps_per_thread):
            seen[index].append(shared.step(x_t))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.steps == 2 * steps_per_thread
    remaining = [output.tobytes() for output in serial]
    for output in seen[0] + seen[1]:
        assert output.tobytes() in remaining, "an output that no serial step produces: steps interleaved"
        remaining.remove(output.tobytes())
    np.testing.assert_array_equal(shared.state[0], serial_stream.state[0])
    np.testing.assert_array_equal(shared.state[1], serial_stream.state[1])


def test_stream_run_chunks_from_two_threads_are_serialised(fast_thread_switching):
    model = threaded_model()
    chunk = np.random.default_rng(2).standard_normal((3, 10, 3)).astype(np.float32)
    serial_stream = model.stream(batch=3)
    serial = [serial_stream.run(chunk) for _ in range(20)]
    shared = model.stream(batch=3)
    outputs = []
    lock = threading.Lock()

    def work():
        for _ in range(10):
            result = shared.run(chunk)
            with lock:
                outputs.append(result.tobytes())

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outputs) == sorted(output.tobytes() for output in serial)
    np.testing.assert_array_equal(shared.state[1], serial_stream.state[1])
