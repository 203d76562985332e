"""nn.GRU as PyTorch's two ONNX exporters write it, imported and run through the session.

The graphs are rebuilt here node for node from what ``torch.onnx.export`` writes (torch 2.13):

- TorchScript (``dynamo=False``, here without constant folding): a zero initial_h from
  ConstantOfShape(Concat(L*D, batch from Shape(x), H)), sliced per layer; weights reordered from
  PyTorch's r|z|n gates by Slice/Concat/Unsqueeze over the parameters; a GRU node per layer
  (linear_before_reset=1); Squeeze (one direction) or Transpose(0, 2, 1, 3) + Reshape(0, 0, -1)
  (two) between layers; h_n = Concat of every layer's Y_h; nn.Linear as MatMul + Add, or Gather
  of the last step + Gemm(transB=1).
- dynamo/onnxscript (``dynamo=True``): initial_h from Expand(0, Concat(L*D, Shape(x)[b:b+1], H)),
  weights already in ONNX order, GRU with layout=0, Transpose(0, 2, 1, 3) + Reshape to a shape
  computed from Shape/Slice/Mul, the same heads.

onnxruntime on the same graph is the oracle. When torch is installed, real modules are exported
too and the session is compared with the module itself.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gru_engine.exporters import onnx_session
from gru_engine.spec import max_excess

FEATURES, UNITS, OUTPUTS = 3, 4, 2


class _Builder:
    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"/{hint}_{self.count}"

    def const(self, array, hint="Constant"):
        out = self.name(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(array))))
        return out

    def init(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def op(self, op_type, inputs, outputs=1, **attributes):
        names = [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attributes))
        return names[0] if outputs == 1 else names

    def ints(self, *values):
        return self.const(np.array(values, np.int64))


def _torch_parameters(rng, layers, directions):
    """nn.GRU's parameters: weight_ih_l{k}[_reverse] (3H, I) with gate rows r | z | n, and so on."""
    params = {}
    for layer, direction in itertools.product(range(layers), range(directions)):
        suffix = f"l{layer}" + ("_reverse" if direction else "")
        inputs = FEATURES if layer == 0 else UNITS * directions
        for name, shape in (("weight_ih", (3 * UNITS, inputs)), ("weight_hh", (3 * UNITS, UNITS)),
                            ("bias_ih", (3 * UNITS,)), ("bias_hh", (3 * UNITS,))):
            params[f"{name}_{suffix}"] = rng.normal(0, 0.4, shape).astype(np.float32)
    return params


def _onnx_order(b, tensor):
    """r | z | n rows -> z | r | n, with TorchScript's Slice + Concat."""
    h = UNITS
    pieces = [b.op("Slice", [tensor, b.ints(start), b.ints(stop), b.ints(0)]) for start, stop in
              ((h, 2 * h), (0, h), (2 * h, 3 * h))]
    return b.op("Concat", pieces, axis=0)


def _torchscript_weights(b, params, layer, directions):
    stacked = {"W": [], "R": [], "B": []}
    for direction in range(directions):
        suffix = f"l{layer}" + ("_reverse" if direction else "")
        w = _onnx_order(b, b.init(f"weight_ih_{suffix}", params[f"weight_ih_{suffix}"]))
        r = _onnx_order(b, b.init(f"weight_hh_{suffix}", params[f"weight_hh_{suffix}"]))
        bias = b.op("Concat", [_onnx_order(b, b.init(f"bias_ih_{suffix}", params[f"bias_ih_{suffix}"])),
                               _onnx_order(b, b.init(f"bias_hh_{suffix}", params[f"bias_hh_{suffix}"]))], axis=0)
        for key, value in (("W", w), ("R", r), ("B", bias)):
            stacked[key].append(b.op("Unsqueeze", [value, b.ints(0)]))
    return [values[0] if directions == 1 else b.op("Concat", values, axis=0) for values in stacked.values()]


def _dynamo_weights(b, params, layer, directions):
    def reorder(array):
        r, z, n = np.split(array, 3)
        return np.concatenate([z, r, n])
    suffixes = [f"l{layer}" + ("_reverse" if d else "") for d in range(directions)]
    w = np.stack([reorder(params[f"weight_ih_{s}"]) for s in suffixes])
    r = np.stack([reorder(params[f"weight_hh_{s}"]) for s in suffixes])
    bias = np.stack([np.concatenate([reorder(params[f"bias_ih_{s}"]), reorder(params[f"bias_hh_{s}"])])
                     for s in suffixes])
    return [b.init(f"val_{layer}_{key}", array) for key, array in (("W", w), ("R", r), ("B", bias))]


def pytorch_graph(path, exporter, batch_first, layers, bidirectional, head, seed=0):
    """Write the graph ``exporter`` ("torchscript" or "dynamo") makes of
    ``y, h = nn.GRU(FEATURES, UNITS, layers, batch_first, bidirectional)(x)`` and nn.Linear over y
    (``head="sequence"``) or over its last step (``"last"``); outputs (linear, h)."""
    rng = np.random.default_rng(seed)
    directions = 2 if bidirectional else 1
    params = _torch_parameters(rng, layers, directions)
    b = _Builder()
    batch_axis = 0 if batch_first else 1
    if exporter == "torchscript":
        batch = b.op("Gather", [b.op("Shape", ["x"]), b.const(np.int64(batch_axis))], axis=0)
        dims = [b.op("Unsqueeze", [b.const(np.int64(v)) if not isinstance(v, str) else v, b.ints(0)])
                for v in (layers * directions, batch, UNITS)]
        zeros = b.op("ConstantOfShape", [b.op("Concat", dims, axis=0)],
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))
    else:
        batch = b.op("Shape", ["x"], start=batch_axis, end=batch_axis + 1)
        zeros = b.op("Expand", [b.const(np.float32(0)), b.op("Concat", [b.ints(layers * directions), batch,
                                                                       b.ints(UNITS)], axis=0)])
    data = b.op("Transpose", ["x"], perm=[1, 0, 2]) if batch_first else "x"
    states = []
    for layer in range(layers):
        h0 = b.op("Slice", [zeros, b.ints(layer * directions), b.ints((layer + 1) * directions), b.ints(0)])
        weights = (_torchscript_weights if exporter == "torchscript" else _dynamo_weights)(b, params, layer,
                                                                                           directions)
        options = {"layout": 0} if exporter == "dynamo" else {}
        if bidirectional:
            options["direction"] = "bidirectional"
        y, y_h = b.op("GRU", [data, *weights, "", h0], outputs=2, hidden_size=UNITS, linear_before_reset=1,
                      **options)
        states.append(y_h)
        if exporter == "torchscript" and not bidirectional:
            data = b.op("Squeeze", [y, b.ints(1)])
        elif exporter == "torchscript":
            data = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.ints(0, 0, -1)])
        else:
            moved = b.op("Transpose", [y], perm=[0, 2, 1, 3])
            shape = b.op("Shape", [moved], start=0)
            sizes = [b.op("Slice", [shape, b.ints(i), b.ints(i + 1)]) for i in range(4)]
            joined = b.op("Reshape", [b.op("Mul", [sizes[2], sizes[3]]), b.ints(-1)])
            data = b.op("Reshape", [moved, b.op("Concat", [sizes[0], sizes[1], joined], axis=0)])
    out = b.op("Transpose", [data], perm=[1, 0, 2]) if batch_first else data
    kernel = rng.normal(0, 0.4, (OUTPUTS, UNITS * directions)).astype(np.float32)  # nn.Linear weight (O, I)
    bias = rng.normal(0, 0.4, OUTPUTS).astype(np.float32)
    if head == "last":
        last = b.op("Gather", [out, b.const(np.int64(-1))], axis=1 if batch_first else 0)
        b.nodes.append(helper.make_node("Gemm", [last, b.init("fc.weight", kernel), b.init("fc.bias", bias)], ["y"],
                                        transB=1))
    else:
        product = b.op("MatMul", [out, b.init("fc.weight_t", kernel.T)])
        b.nodes.append(helper.make_node("Add", [product, b.init("fc.bias", bias)], ["y"]))
    b.nodes.append(helper.make_node("Concat", states, ["h"], axis=0))
    x_dims = ["batch", "time", FEATURES] if batch_first else ["time", "batch", FEATURES]
    graph = helper.make_graph(b.nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [None] * (3 if head == "sequence" else 2)),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT,
                                                             [layers * directions, "batch", UNITS])],
                              b.initializers)
    version = "2.13.0" if exporter == "torchscript" else "2.13.0+cpu"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="pytorch",
                              producer_version=version)
    model.ir_version = 10
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _x(batch_first, batch=3, steps=6, seed=1):
    x = np.random.default_rng(seed).standard_normal((batch, steps, FEATURES)).astype(np.float32)
    return x if batch_first else np.ascontiguousarray(x.swapaxes(0, 1))


@pytest.mark.parametrize("exporter, batch_first, layers, bidirectional", [
    (e, bf, layers, bi) for e in ("torchscript", "dynamo") for bf in (True, False) for layers in (1, 2, 3)
    for bi in (False, True) if layers != 2 or (e == "dynamo" and bf)])
def test_pytorch_export_structures_match_onnxruntime(tmp_path, exporter, batch_first, layers, bidirectional):
    path = pytorch_graph(tmp_path / "gru.onnx", exporter, batch_first, layers, bidirectional,
                         "sequence" if bidirectional else "last")
    session = onnx_session(path)
    x = _x(batch_first)
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})
    actual = session.run(None, {"x": x})
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected):
        assert max_excess(a, e) <= 0
    model = session.model.spec
    assert model.source["producer"].startswith("pytorch 2.13.0")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (its wheels are too heavy for CI); the exporters' graph "
                           "structures are covered by test_pytorch_export_structures_match_onnxruntime")
@pytest.mark.parametrize("dynamo", [False, True])
def test_real_pytorch_modules(tmp_path, dynamo):
    """Real nn.GRU modules exported by torch.onnx: the session equals the module."""
    import torch

    if dynamo and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")

    class Model(torch.nn.Module):
        def __init__(self, batch_first, layers, bidirectional):
            super().__init__()
            self.gru = torch.nn.GRU(FEATURES, UNITS, layers, batch_first=batch_first, bidirectional=bidirectional)
            self.fc = torch.nn.Linear(UNITS * (1 + bidirectional), OUTPUTS)
            self.batch_first, self.bidirectional = batch_first, bidirectional

        def forward(self, x):
            y, h = self.gru(x)
            if self.bidirectional:
                return self.fc(y), h
            return self.fc(y[:, -1] if self.batch_first else y[-1]), h

    torch.manual_seed(0)
    for index, (batch_first, layers, bidirectional) in enumerate([(True, 1, False), (False, 3, True),
                                                                  (True, 2, True), (False, 2, False)]):
        module = Model(batch_first, layers, bidirectional).eval()
        x = _x(batch_first, seed=index)
        path = tmp_path / f"m{index}.onnx"
        axes = {0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}
        options = dict(dynamic_shapes={"x": {k: torch.export.Dim(v) for k, v in axes.items()}}) if dynamo \
            else dict(dynamic_axes={"x": axes})
        torch.onnx.export(module, (torch.from_numpy(x),), str(path), dynamo=dynamo, input_names=["x"],
                          output_names=["y", "h"], **options)
        with torch.no_grad():
            expected = [t.numpy() for t in module(torch.from_numpy(x))]
        session = onnx_session(path)
        for actual, wanted in zip(session.run(None, {"x": x}), expected):
            assert max_excess(actual, wanted) <= 0, (batch_first, layers, bidirectional)
