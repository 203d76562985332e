"""The front-end kinds (Conv1D, pooling, BatchNormalization) in ONNX, both ways: native ``Conv``,
``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, ``GlobalMaxPool`` and ``BatchNormalization``.

ONNX convolution and pooling read (batch, channels, time); the engine's layers run on (batch, time,
channels) and the GRU nodes on (time, batch, channels). The writer moves a sequence to channels-first
once before a run of front-end layers and back once after it.

Mapping (Keras -> ONNX, and back when importing, e.g. a PyTorch ``nn.Conv1d`` front-end):

- Conv1D: W = kernel.transpose(2, 1, 0) (filters, channels / groups, kernel_size), B = bias,
  ``group``, ``dilations``, ``strides``; padding 'valid' is pads [0, 0], 'causal' [window - 1, 0],
  'same' [(window - 1) // 2, window - 1 - (window - 1) // 2] at strides 1 and auto_pad SAME_UPPER
  otherwise (ONNX and TensorFlow both put the odd step at the end; its size depends on the input
  length), window = (kernel_size - 1) * dilation + 1. The activation follows as its own node.
- Max/AveragePooling1D: ``kernel_shape``, ``strides``, the same pads; AveragePool with
  count_include_pad=0, because Keras divides by the steps inside the input. 'same' with
  1 < pool_size < strides is refused: onnxruntime rejects the negative padding SAME_UPPER implies.
- GlobalAverage/MaxPooling1D: the global node, then Squeeze of the time axis.
- BatchNormalization: folded into a linear Conv1D or Dense before it (``frontends.fold_batch_norms``),
  otherwise the ONNX node (scale = gamma or ones, B = beta or zeros).
"""

from __future__ import annotations

import numpy as np

from gru_engine import frontends
from gru_engine.errors import UnsupportedModelError

ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax"}  # else linear
POOL_OPS = {"max_pooling1d": "MaxPool", "average_pooling1d": "AveragePool",
            "global_max_pooling1d": "GlobalMaxPool", "global_average_pooling1d": "GlobalAveragePool"}


# ----- writing -----------------------------------------------------------------------------------

def _padding_attributes(size: int, strides: int, padding: str) -> dict:
    if padding == "valid":
        return {"pads": [0, 0]}
    if padding == "causal":
        return {"pads": [size - 1, 0]}
    if strides == 1:
        return {"pads": [(size - 1) // 2, size - 1 - (size - 1) // 2]}
    return {"auto_pad": "SAME_UPPER"}


def time_major(g, x: str, channels_first: bool) -> str:
    """A channels-first sequence (B, C, T) back to the GRU nodes' (T, B, C); anything else unchanged."""
    return g.add("Transpose", [x], "time_major", perm=[2, 0, 1]) if channels_first else x


def batch_major(g, x: str, channels_first: bool, hint: str) -> str:
    """A sequence as the graph returns it, (B, T, C)."""
    return g.add("Transpose", [x], hint, perm=[0, 2, 1] if channels_first else [1, 0, 2])


def write_layer(g, layer, shape, x: str, channels_first: bool) -> tuple[str, bool]:
    """Append one front-end layer; x is a sequence, (T, B, C) or channels-first (B, C, T), or (B, C).

    Returns the output and whether it is a channels-first sequence.
    """
    name, config, weights = layer.name, layer.config, layer.weights
    if shape.input_is_sequence and not channels_first:
        x = g.add("Transpose", [x], f"{name}.channels_first", perm=[1, 2, 0])  # (T, B, C) -> (B, C, T)
    if layer.kind == "conv1d":
        size = (config["kernel_size"] - 1) * config["dilation_rate"] + 1
        inputs = [x, g.constant(f"{name}.W", np.ascontiguousarray(weights["kernel"].transpose(2, 1, 0)))]
        if config["use_bias"]:
            inputs.append(g.constant(f"{name}.B", weights["bias"]))
        y = g.add("Conv", inputs, f"{name}.conv", node=name, kernel_shape=[config["kernel_size"]],
                  strides=[config["strides"]], dilations=[config["dilation_rate"]], group=config["groups"],
                  **_padding_attributes(size, config["strides"], config["padding"]))
        activation = config["activation"]
        if activation in ACTIVATIONS:
            over_channels = {"axis": 1} if activation == "softmax" else {}
            y = g.add(ACTIVATIONS[activation], [y], f"{name}.{activation}", **over_channels)
        return y, True
    if layer.kind in frontends.POOLING_KINDS:
        size, strides, padding = config["pool_size"], config["strides"], config["padding"]
        if padding == "same" and size < strides:
            if size > 1:
                raise UnsupportedModelError(
                    f"layer '{name}' ({frontends.KERAS_CLASS_NAMES[layer.kind]}): padding 'same' with pool_size "
                    f"{size} < strides {strides} has no ONNX form (onnxruntime refuses the negative padding it "
                    "implies); use pool_size >= strides or padding 'valid'")
            padding = "valid"  # a single-step window never reaches padding: the same windows
        extra = {"count_include_pad": 0} if layer.kind == "average_pooling1d" else {}
        return g.add(POOL_OPS[layer.kind], [x], f"{name}.pool", node=name, kernel_shape=[config["pool_size"]],
                     strides=[strides], **extra, **_padding_attributes(size, strides, padding)), True
    if layer.kind in frontends.GLOBAL_POOLING_KINDS:
        pooled = g.add(POOL_OPS[layer.kind], [x], f"{name}.pool", node=name)  # (B, C, 1)
        return g.add("Squeeze", [pooled, g.ints(2)], f"{name}.squeezed"), False
    channels = shape.input_dim
    gamma = weights["gamma"] if config["scale"] else np.ones(channels, np.float32)
    beta = weights["beta"] if config["center"] else np.zeros(channels, np.float32)
    y = g.add("BatchNormalization", [x, g.constant(f"{name}.scale", gamma), g.constant(f"{name}.B", beta),
                                     g.constant(f"{name}.mean", weights["moving_mean"]),
                                     g.constant(f"{name}.var", weights["moving_variance"])],
              f"{name}.normalized", node=name, epsilon=config["epsilon"])
    return y, shape.input_is_sequence
