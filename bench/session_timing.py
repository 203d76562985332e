"""onnxruntime and ``gru_engine.InferenceSession`` on one imported ONNX graph, interleaved.

    python -m gru_engine.bench.session_timing

The graph: one GRU node (64 units over 8 features, linear_before_reset=1) with a ``sequence_lens``
input and both outputs Y and Y_h, X time-major as the node reads it: what a user switching from
onnxruntime brings. One thread each; the median of 7 rounds, each a loop of calls alternating
between the two.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

UNITS, FEATURES, STEPS = 64, 8, 50
ROUNDS = 7


def build_graph(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    from gru_engine.fileio import atomic_write_bytes

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name) for name, shape in (
        ("W", (1, 3 * UNITS, FEATURES)), ("R", (1, 3 * UNITS, UNITS)), ("B", (1, 6 * UNITS)))]
    node = helper.make_node("GRU", ["X", "W", "R", "B", "sequence_lens"], ["Y", "Y_h"], hidden_size=UNITS,
                            linear_before_reset=1)
    graph = helper.make_graph(
        [node], "gru", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", "batch", FEATURES]),
                        helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["time", 1, "batch", UNITS]),
         helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "batch", UNITS])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return atomic_write_bytes(path, model.SerializeToString())


def main() -> None:
    import numba
    import onnxruntime as ort

    import gru_engine
    from gru_engine.exporters import import_onnx

    numba.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as workdir:
        graph = build_graph(Path(workdir) / "gru.onnx")
        sessions = {"onnxruntime": ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"]),
                    "gru-engine": gru_engine.InferenceSession(import_onnx(graph, Path(workdir) / "gru.gru.safetensors"))}
        rng = np.random.default_rng(1)
        print(f"{'batch':>5}  {'onnxruntime':>12}  {'gru-engine':>12}  ratio")
        for batch, calls in ((1, 2000), (64, 100)):
            feed = {"X": rng.standard_normal((STEPS, batch, FEATURES)).astype(np.float32),
                    "sequence_lens": np.full(batch, STEPS, np.int32)}
            times = {name: [] for name in sessions}
            for session in sessions.values():  # warm: allocations and caches, not timed
                session.run(None, feed)
            for _ in range(ROUNDS):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        session.run(None, feed)
                    times[name].append((time.perf_counter() - start) / calls * 1e6)
            ort_us, engine_us = (float(np.median(times[name])) for name in sessions)
            print(f"{batch:>5}  {ort_us:>9.1f} us  {engine_us:>9.1f} us  {ort_us / engine_us:.2f}x")


if __name__ == "__main__":
    main()
