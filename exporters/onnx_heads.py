"""Heads of an ONNX graph: merges of a GRU's two directions and Dense layers (MatMul/Gemm, bias,
activation)."""

from __future__ import annotations

import dataclasses

import numpy as np

from gru_engine.spec import Layer

from .onnx_values import (BATCH, DIRECTION, FEATURE, _Chain, _Const, _describe, _Recurrent, _Shape, _StateInput,
                          _States, _Zeros, carry_keys, state_keys)


class HeadOps:
    """``_op_<Type>`` handlers of the reader for merges and Dense layers."""

    # ----- merges and arithmetic -----
    def _merge(self, forward, backward, mode) -> _Chain:
        """Two GRU directions over the same input -> a Bidirectional layer (merge_mode None, concat, ...)."""
        pair = (forward, backward)
        if not all(isinstance(v, _Recurrent) and len(v.directions) == 1 for v in pair):
            self.fail(f"combines {_describe(forward)} and {_describe(backward)}; only two GRU directions merge")
        f, b = forward.directions[0], backward.directions[0]
        sequence = forward.sequence
        if backward.sequence != sequence or forward.axes != backward.axes or f.source is not b.source \
                or f.kind != b.kind or forward.carry or backward.carry:
            self.fail("merges GRU outputs of different kinds, layouts or inputs")
        if f.config["go_backwards"] or not b.config["go_backwards"]:
            self.fail("a Bidirectional merge takes the forward direction first and the backward one second")
        if sequence and f.flipped == b.flipped:
            self.fail("the two directions' sequences are not aligned in time")
        if mode not in ("concat", None) and f.config["units"] != b.config["units"]:
            self.fail(f"merge '{mode}' needs the same units in both directions")
        zero_output = not (forward.state and backward.state)
        configs = {"forward": dict(f.config, return_sequences=sequence, zero_output_for_mask=zero_output),
                   "backward": dict(b.config, return_sequences=sequence, zero_output_for_mask=zero_output)}
        weights = {f"{side}.{name}": array for side, d in (("forward", f), ("backward", b))
                   for name, array in d.weights.items()}
        wrapped = {"layer": f.kind} if f.kind != "gru" else {}  # as the Keras reader writes it
        layer = Layer("bidirectional", f.name, {"merge_mode": mode, **wrapped, **configs}, weights)
        width = f.config["units"] + (b.config["units"] if mode == "concat" else 0)
        origin = carry_keys(f) + carry_keys(b)
        return _Chain(f.source.layers + (layer,), forward.axes, width, f.flipped and sequence,
                      open="sum" if mode == "sum" else "", origin=origin, keys=f.source.keys + (origin,))

    def _op_Concat(self, operands, attributes):
        if all(isinstance(v, _Shape) or (isinstance(v, _Const) and v.array.dtype.kind == "i") for v in operands):
            dims = sum((v.dims if isinstance(v, _Shape) else tuple(int(d) for d in v.array.reshape(-1))
                        for v in operands), ())
            return _Shape(dims)
        if all(isinstance(v, _Zeros) for v in operands):
            return operands[0]
        if all(isinstance(v, _States) or (isinstance(v, _Recurrent) and v.state) for v in operands) \
                and len({v.axes for v in operands}) == 1 \
                and operands[0].axes[self.axis(operands[0], attributes.get("axis", 0))] == DIRECTION:
            # PyTorch's h_n: every layer's Y_h, stacked.
            keys = sum((v.keys if isinstance(v, _States) else state_keys(v) for v in operands), ())
            return _States(keys, operands[0].axes)
        if all(isinstance(v, _StateInput) and v.axes[0] == DIRECTION for v in operands) \
                and attributes.get("axis") in (0, -3):
            return _StateInput(operands[0].axes, sum((v.sources for v in operands), ()))
        if len(operands) == 2 and all(isinstance(v, _Recurrent) for v in operands) \
                and operands[0].axes[self.axis(operands[0], attributes.get("axis", 0))] == FEATURE:
            return self._merge(operands[0], operands[1], "concat")
        self.fail("only the two directions of a GRU (along the feature axis) or shape vectors are concatenated")

    def _op_Add(self, operands, attributes):
        if all(isinstance(v, _Recurrent) for v in operands):
            return self._merge(operands[0], operands[1], "sum")
        data, bias = operands if isinstance(operands[1], _Const) else operands[::-1]
        if not isinstance(bias, _Const):
            self.fail("adds two tensors that are not the two directions of a GRU")
        chain = self.chain(data)
        if chain.open != "kernel" or chain.axes[-1] != FEATURE:
            self.fail("adds a constant that is not the bias of a MatMul over the feature axis")
        array = bias.array  # broadcast along the feature axis only: (), (U,), (1, U), (1, 1, U), ...
        along_features = array.ndim <= len(chain.axes) and all(size == 1 for size in array.shape[:-1]) \
            and array.size in (1, chain.width)
        if array.dtype != np.float32 or not along_features:
            self.fail(f"adds a constant of shape {array.shape} {array.dtype}; a Dense bias is ({chain.width},) float32")
        layer = chain.layers[-1]
        weights = dict(layer.weights, bias=np.broadcast_to(array.reshape(-1), (chain.width,)).astype(np.float32))
        layer = dataclasses.replace(layer, config=dict(layer.config, use_bias=True), weights=weights)
        return dataclasses.replace(chain, layers=chain.layers[:-1] + (layer,), open="bias")

    def _average(self, operands, factor: float):
        data, constant = operands if isinstance(operands[1], _Const) else operands[::-1]
        if isinstance(data, _Chain) and data.open == "sum" and isinstance(constant, _Const) \
                and constant.array.size == 1 and float(constant.array.reshape(-1)[0]) == factor:
            layer = data.layers[-1]
            layer = dataclasses.replace(layer, config=dict(layer.config, merge_mode="ave"))
            return dataclasses.replace(data, layers=data.layers[:-1] + (layer,), open="")
        return None

    def _op_Mul(self, operands, attributes):
        if all(isinstance(v, _Shape) for v in operands):  # directions x units, in PyTorch's shape arithmetic
            if not all(len(v.dims) == 1 and isinstance(v.dims[0], int) for v in operands):
                self.fail("multiplies sizes that are not fixed")
            return _Shape((operands[0].dims[0] * operands[1].dims[0],), operands[0].scalar)
        if all(isinstance(v, _Recurrent) for v in operands):
            return self._merge(operands[0], operands[1], "mul")
        average = self._average(operands, 0.5)
        if average is None:
            self.fail("multiplies tensors other than the two directions of a GRU, or their sum by 0.5")
        return average

    def _op_Div(self, operands, attributes):
        average = self._average(operands, 2.0) if isinstance(operands[1], _Const) else None
        if average is None:
            self.fail("divides anything but the sum of a GRU's two directions by 2")
        return average

    # ----- dense -----
    def _dense(self, chain: _Chain, kernel: np.ndarray, bias: np.ndarray | None) -> _Chain:
        """Append a Dense layer: x (..., I) @ kernel (I, U) (+ bias (U,))."""
        if chain.axes[-1] != FEATURE:
            self.fail(f"multiplies axes ({', '.join(chain.axes)}); a Dense layer acts on the last, feature axis")
        if kernel.dtype != np.float32 or kernel.ndim != 2 or kernel.shape[0] != chain.width:
            self.malformed(f"the weight is {kernel.dtype} {kernel.shape}; a Dense kernel here is float32 "
                           f"({chain.width}, units)")
        config = {"units": int(kernel.shape[1]), "activation": "linear", "use_bias": bias is not None}
        weights = {"kernel": np.ascontiguousarray(kernel)}
        if bias is not None:
            weights["bias"] = bias
        layer = Layer("dense", self.layer_name(), config, weights)
        return _Chain(chain.layers + (layer,), chain.axes, config["units"], chain.flipped,
                      open="bias" if bias is not None else "kernel", keys=chain.keys + ((),))

    def _op_MatMul(self, operands, attributes):
        if isinstance(operands[0], _Const):
            self.fail("multiplies a constant by the data; a Dense layer is data @ weight")
        return self._dense(self.chain(operands[0]), self.constant(operands[1], "the weight"), None)

    def _op_Gemm(self, operands, attributes):
        chain = self.chain(operands[0])
        if chain.axes != (BATCH, FEATURE) or attributes.get("transA", 0):
            self.fail(f"Gemm on axes ({', '.join(chain.axes)}); a Dense Gemm takes (batch, features), transA=0")
        alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
        kernel = self.constant(operands[1], "the weight")
        kernel = kernel.T if attributes.get("transB", 0) else kernel
        bias = None
        if len(operands) > 2 and operands[2] is not None:
            bias = self.constant(operands[2], "the bias")
            units = kernel.shape[-1]
            if bias.dtype != np.float32 or bias.size not in (1, units):
                self.malformed(f"the bias is {bias.dtype} {bias.shape}; a Dense bias here is float32 ({units},)")
            bias = np.broadcast_to(bias.reshape(-1) * np.float32(beta), (units,)).astype(np.float32)
        return self._dense(chain, (kernel * np.float32(alpha)).astype(kernel.dtype) if alpha != 1 else kernel, bias)

    def _activation(self, operands, name: str):
        chain = self.chain(operands[0])
        if chain.open not in ("kernel", "bias"):
            self.fail("an activation is supported right after a MatMul/Gemm (+ bias), as a Dense layer's")
        layer = chain.layers[-1]
        layer = dataclasses.replace(layer, config=dict(layer.config, activation=name))
        return dataclasses.replace(chain, layers=chain.layers[:-1] + (layer,), open="")

    def _op_Relu(self, operands, attributes):
        return self._activation(operands, "relu")

    def _op_Sigmoid(self, operands, attributes):
        return self._activation(operands, "sigmoid")

    def _op_Tanh(self, operands, attributes):
        return self._activation(operands, "tanh")

    def _op_Softmax(self, operands, attributes):
        value = operands[0]
        rank = len(value.axes) if isinstance(value, (_Chain, _Recurrent)) else 0
        axis = attributes.get("axis", -1 if self.opset >= 13 else 1)
        if not rank or self.axis(value, axis) != rank - 1:
            self.fail("Softmax must run over the last (feature) axis")
        return self._activation(operands, "softmax")
