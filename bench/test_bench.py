"""pytest-benchmark over the registry: one group per workload, one test per implementation.

With the default ``--benchmark-disable`` every call runs once: a smoke test that each available
implementation prepares, runs, and agrees with gru-engine. ``pytest bench --benchmark-enable``
times them (one thread for numba and onnxruntime; TensorFlow keeps the test process's pools, so
``gru-engine bench`` is the fair comparison). Implementations that are not installed, or do not
apply to a model, are skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from gru_engine.bench import runner
from gru_engine.bench.registry import IMPLEMENTATIONS, Subject
from gru_engine.bench.workloads import builtin_workloads
from gru_engine.spec import max_excess

THREADS = 1
# Small latency workloads, so the smoke run stays quick: a window, a batch, a longer sequence, streams.
WORKLOADS = [workload for workload in builtin_workloads(quick=False)
             if workload.name in ("airline-b1", "airline-b32", "h32-t100", "airline-step", "lstm-airline-b1",
                                  "lstm-airline-step", "causal-conv-step")]
CASES = [pytest.param(workload, name, id=f"{workload.name}-{name}")
         for workload in WORKLOADS for name, impl in IMPLEMENTATIONS.items() if workload.runs(impl)]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """One Keras model per recipe, built once per module (TensorFlow is imported once)."""
    pytest.importorskip("keras", reason="the benchmark models are built with Keras")
    built: dict[str, Subject] = {}

    def subject_for(recipe) -> Subject:
        if recipe.key not in built:
            built[recipe.key] = Subject(recipe.build(), name=recipe.key,
                                        workdir=tmp_path_factory.mktemp(recipe.key), transforms=recipe.transform_steps())
        return built[recipe.key]
    return subject_for


@pytest.fixture(scope="module")
def reference_outputs(subjects):
    """gru-engine's first-call output for each workload: what every peer's first call must match."""
    cache = {}

    def reference(workload) -> np.ndarray:
        if workload.name not in cache:
            baseline = IMPLEMENTATIONS["engine-stream" if workload.per_step else "engine"]
            call = runner.prepare_call(baseline, subjects(workload.recipe), workload, workload.input())
            cache[workload.name] = np.asarray(first_output(call()))
        return cache[workload.name]
    return reference


def first_output(result):
    return result[0] if isinstance(result, (list, tuple)) else result


@pytest.mark.parametrize("workload, name", CASES)
def test_implementation(benchmark, workload, name, subjects, reference_outputs):
    impl = IMPLEMENTATIONS[name]
    subject = subjects(workload.recipe)
    reason = runner.unavailable_reason(impl, subject)
    if reason:
        pytest.skip(f"{name} {reason[0]}: {reason[1]}")
    try:
        call = runner.prepare_call(impl, subject, workload, workload.input())
    except ImportError as exc:  # an exporter this build does not have yet
        pytest.skip(f"{name} unavailable: {exc}")
    # The first call (zero state for a stream) is checked, and keeps tracing/JIT out of the timing.
    output = np.asarray(first_output(call()))
    expected = reference_outputs(workload)
    assert output.shape == expected.shape
    assert max_excess(output, expected) <= 0, f"{name} differs from gru-engine by {np.max(np.abs(output - expected))}"
    benchmark.group = workload.name
    benchmark.extra_info.update(threads=THREADS, title=workload.title, items_per_call=workload.items_per_call)
    benchmark(call)


@pytest.mark.parametrize("name", [name for name, impl in IMPLEMENTATIONS.items() if impl.streaming])
def test_stream_carries_state_across_a_window(name, subjects):
    """Stepping a window with the state fed back ends where one predict over the window ends."""
    impl = IMPLEMENTATIONS[name]
    workload = next(workload for workload in WORKLOADS if workload.per_step)
    subject = subjects(workload.recipe)
    reason = runner.unavailable_reason(impl, subject)
    if reason:
        pytest.skip(f"{name} {reason[0]}: {reason[1]}")
    x = workload.input(seed=3).repeat(2, axis=0)  # (2, T, features): batch 2 exercises the state shapes
    x[1] *= -0.5
    try:
        stepped = impl.prepare(subject, THREADS)(x)[0]
    except ImportError as exc:
        pytest.skip(f"{name} unavailable: {exc}")
    expected = IMPLEMENTATIONS["engine"].prepare(subject, THREADS)(x)[0]
    assert stepped.shape == expected.shape
    assert max_excess(stepped, expected) <= 0
