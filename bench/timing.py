"""Timing: calibrated samples of back-to-back calls, taken round-robin across implementations.

A sample is N calls timed with ``time.perf_counter_ns`` and divided by N; N is calibrated so a
sample lasts about ``Budget.sample_s`` (microsecond calls are timed in bulk, slow ones one by one).
Sampling goes in rounds: each round every implementation takes samples for about ``slice_s``
(at least one), in an order rotated from round to round, so drift on the machine (frequency
scaling, a neighbour's load) hits every implementation alike. The garbage collector is off during
a sample, as in ``timeit``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable

import numpy as np
from numba import njit

from gru_engine._flags import KERNEL_FLAGS, prefer_wide_vectors
from gru_engine.program import aligned_empty

Call = Callable[[], object]


@dataclasses.dataclass(frozen=True)
class Budget:
    sample_s: float   # target length of one sample
    slice_s: float    # time each implementation gets per round
    seconds: float    # sampling time per workload, once min_rounds are done
    min_rounds: int
    max_rounds: int
    warm_up_s: float  # untimed calls after the first, so caches and branch predictors settle


QUICK = Budget(sample_s=0.002, slice_s=0.02, seconds=1.5, min_rounds=3, max_rounds=200, warm_up_s=0.05)
FULL = Budget(sample_s=0.005, slice_s=0.05, seconds=6.0, min_rounds=7, max_rounds=2000, warm_up_s=0.2)


def time_calls(call: Call, calls: int) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        return (time.perf_counter_ns() - start) / calls / 1e9
    finally:
        if collecting:
            gc.enable()


def warm_up(call: Call, seconds: float) -> tuple[float, object]:
    """Call once (timed: JIT compilation, tracing and first-touch costs land here), then a few more."""
    start = time.perf_counter_ns()
    result = call()
    first = (time.perf_counter_ns() - start) / 1e9
    if isinstance(result, np.ndarray):
        result = result.copy()  # a call may return a buffer it writes again (out=)
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < 2 or (time.perf_counter() < deadline and calls < 1000):
        call()
        calls += 1
    return first, result


def calibrate(call: Call, sample_s: float) -> int:
    """Calls per sample so that one sample lasts about ``sample_s``."""
    calls = 1
    while True:
        per_call = time_calls(call, calls)
        if per_call * calls >= sample_s / 10 or calls >= 1 << 20:
            return max(1, round(sample_s / per_call)) if per_call > 0 else calls
        calls *= 10


# Thread pools keep spinning for a while after their last task: onnxruntime's, left to its
# defaults as its users run it, took the cores from the implementation timed next (measured, LSTM
# airline at batch 1024 on 2 cores: the engine's time 13.4 -> 16.6 ms; a 10 ms pause was not enough).
SETTLE_S = 0.05


def round_robin(calls: dict[str, Call], budget: Budget, settle_s: float = 0.0
                ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per-call seconds of every sample of every call, and the error of each call that raised;
    ``settle_s``: a pause before each implementation's slice (multi-threaded workloads: SETTLE_S)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    failures: dict[str, str] = {}
    per_sample = {}
    for name, call in calls.items():
        try:
            per_sample[name] = calibrate(call, budget.sample_s)
        except Exception as exc:  # a peer that breaks mid-run is reported, not fatal to the others
            failures[name] = describe_error(exc)
    active = [name for name in calls if name not in failures]
    start = time.perf_counter()
    rounds = 0
    while active and rounds < budget.max_rounds:
        shift = rounds % len(active)
        for name in active[shift:] + active[:shift]:
            time.sleep(settle_s)
            slice_end = time.perf_counter() + budget.slice_s
            try:
                while True:
                    samples[name].append(time_calls(calls[name], per_sample[name]))
                    if time.perf_counter() >= slice_end:
                        break
            except Exception as exc:
                failures[name] = describe_error(exc)
        active = [name for name in active if name not in failures]
        rounds += 1
        if rounds >= budget.min_rounds and time.perf_counter() - start >= budget.seconds:
            break
    return {name: values for name, values in samples.items() if name not in failures}, failures


def describe_error(exc: BaseException) -> str:
    """One line for a report: the type and the first line of the message."""
    message = str(exc).split(" (/")[0].strip()  # an ImportError's trailing file path is noise here
    return f"{type(exc).__name__}: {message.splitlines()[0]}" if message else type(exc).__name__


def summarize(per_call: list[float]) -> dict:
    """Median and 10th/90th percentiles of per-call seconds."""
    values = np.asarray(per_call, np.float64)  # (samples,)
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"median_s": float(median), "p10_s": float(p10), "p90_s": float(p90), "samples": int(values.size)}


def sgemm_gflops(size: int, budget: Budget) -> dict:
    """numpy's float32 matrix product (size x size) @ (size x size): the machine's practical peak."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)  # (n, n)
    b = rng.standard_normal((size, size)).astype(np.float32)  # (n, n)
    out = np.empty((size, size), np.float32)                  # (n, n)

    def call():
        np.matmul(a, b, out=out)

    warm_up(call, budget.warm_up_s)
    samples, _ = round_robin({"sgemm": call}, budget)
    stats = summarize(samples["sgemm"])
    flops = 2.0 * size ** 3
    return {"size": size, "median_s": stats["median_s"], "gflops": flops / stats["median_s"] / 1e9,
            "gflops_p10": flops / stats["p90_s"] / 1e9, "gflops_p90": flops / stats["p10_s"] / 1e9}


@njit(**KERNEL_FLAGS)
def _read_repeatedly(buffer, times):
    """Sum buffer (N,) ``times`` times over: a pure streaming read, compiled as the engine's kernels are."""
    prefer_wide_vectors()
    total = np.float32(0.0)
    for _ in range(times):
        for i in range(buffer.shape[0]):
            total += buffer[i]
    return total


def weights_read(nbytes: int, budget: Budget) -> dict:
    """Seconds to read ``nbytes`` of float32 weights once, from whichever cache level holds them.

    A batch-1 GRU step reads its whole recurrent kernel, so this is a floor under the step time
    when the kernel does not fit L1 (the H=256 case): no implementation can step faster than it
    can read its weights.
    """
    buffer = aligned_empty((nbytes // 4,))  # (N,)
    buffer[:] = 1.0
    reads = 100  # per call, so the Python call's own cost is spread thin

    def call():
        _read_repeatedly(buffer, reads)

    warm_up(call, budget.warm_up_s)
    samples, _ = round_robin({"read": call}, budget)
    per_read = summarize(samples["read"])["median_s"] / reads
    return {"bytes": int(buffer.nbytes), "median_s": per_read, "gb_per_s": buffer.nbytes / per_read / 1e9}
