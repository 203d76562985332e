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


def carries_history(layer) -> bool:
    """Whether a layer streams with a carried history (a causal, stride-1 Conv1D wider than one step)."""
    return layer.kind == "conv1d" and frontends.not_streamable(layer) is None and frontends.history_steps(layer) > 0


def write_layer(g, layer, shape, x: str, channels_first: bool, history: str | None = None):
    """Append one front-end layer; x is a sequence, (T, B, C) or channels-first (B, C, T), or (B, C).

    ``history``: for a layer that ``carries_history``, the graph input (B, H, C) of its last H inputs
    of earlier calls, read instead of the causal zero padding. Returns the output, whether it is a
    channels-first sequence, and the new history (B, H, C) (None without ``history``).
    """
    name, config, weights = layer.name, layer.config, layer.weights
    if shape.input_is_sequence and not channels_first:
        x = g.add("Transpose", [x], f"{name}.channels_first", perm=[1, 2, 0])  # (T, B, C) -> (B, C, T)
    if layer.kind == "conv1d":
        size = (config["kernel_size"] - 1) * config["dilation_rate"] + 1
        padding = config["padding"]
        if history is not None:
            past = g.add("Transpose", [history], f"{name}.history", perm=[0, 2, 1])   # (B, C, H)
            x = g.add("Concat", [past, x], f"{name}.extended", axis=2)                 # (B, C, H + T)
            last = g.add("Slice", [x, g.ints(1 - size), g.ints(np.iinfo(np.int64).max), g.ints(2)],
                         f"{name}.last")                                                 # (B, C, H)
            history = g.add("Transpose", [last], f"{name}.new_history", perm=[0, 2, 1])  # (B, H, C)
            padding = "valid"
        inputs = [x, g.constant(f"{name}.W", np.ascontiguousarray(weights["kernel"].transpose(2, 1, 0)))]
        if config["use_bias"]:
            inputs.append(g.constant(f"{name}.B", weights["bias"]))
        y = g.add("Conv", inputs, f"{name}.conv", node=name, kernel_shape=[config["kernel_size"]],
                  strides=[config["strides"]], dilations=[config["dilation_rate"]], group=config["groups"],
                  **_padding_attributes(size, config["strides"], padding))
        activation = config["activation"]
        if activation in ACTIVATIONS:
            over_channels = {"axis": 1} if activation == "softmax" else {}
            y = g.add(ACTIVATIONS[activation], [y], f"{name}.{activation}", **over_channels)
        return y, True, history
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
                     strides=[strides], **extra, **_padding_attributes(size, strides, padding)), True, None
    if layer.kind in frontends.GLOBAL_POOLING_KINDS:
        pooled = g.add(POOL_OPS[layer.kind], [x], f"{name}.pool", node=name)  # (B, C, 1)
        return g.add("Squeeze", [pooled, g.ints(2)], f"{name}.squeezed"), False, None
    channels = shape.input_dim
    gamma = weights["gamma"] if config["scale"] else np.ones(channels, np.float32)
    beta = weights["beta"] if config["center"] else np.zeros(channels, np.float32)
    y = g.add("BatchNormalization", [x, g.constant(f"{name}.scale", gamma), g.constant(f"{name}.B", beta),
                                     g.constant(f"{name}.mean", weights["moving_mean"]),
                                     g.constant(f"{name}.var", weights["moving_variance"])],
              f"{name}.normalized", node=name, epsilon=config["epsilon"])
    return y, shape.input_is_sequence, None


# ----- reading (methods of onnx_reader's interpreter: each gets it, the operands and attributes) -----

def _labels():
    from . import onnx_values  # imported here: the writer side needs none of the reader's modules
    return onnx_values


def _channels_first(reader, value):
    """The model data as a (batch, channels, time) sequence, as ONNX convolution and pooling read it."""
    labels = _labels()
    chain = reader.chain(value)
    if chain.axes != (labels.BATCH, labels.FEATURE, labels.TIME) or chain.flipped:
        reader.fail(f"reads axes ({', '.join(chain.axes)}); convolution and pooling read (batch, channels, "
                    "time): Transpose the (batch, time, features) data first")
    return chain


def _keras_padding(reader, attributes, size: int, strides: int, causal: bool) -> str:
    """The Keras padding of ONNX pads / auto_pad for a window of ``size`` steps."""
    auto = attributes.get("auto_pad", "NOTSET")
    if auto == "SAME_UPPER":
        return "same"
    if auto == "VALID":
        return "valid"
    if auto != "NOTSET":
        reader.fail(f"auto_pad {auto}; Keras pads like SAME_UPPER, NOTSET or VALID")
    pads = list(attributes.get("pads", [0, 0]))
    if pads == [0, 0]:
        return "valid"
    if causal and pads == [size - 1, 0]:
        return "causal"
    if strides == 1 and pads == [(size - 1) // 2, size - 1 - (size - 1) // 2]:
        return "same"
    reader.fail(f"pads {pads} match no Keras padding for a window of {size} steps: 'valid' [0, 0], 'causal' "
                f"[{size - 1}, 0], 'same' [{(size - 1) // 2}, {size - 1 - (size - 1) // 2}] (strides 1)")


def _one(reader, attributes, name: str) -> int:
    values = list(attributes.get(name, [1]))
    if len(values) != 1 or not 1 <= values[0] <= frontends.MAX_WINDOW:
        reader.fail(f"{name} {values}; a 1-D window takes one value between 1 and {frontends.MAX_WINDOW}")
    return int(values[0])


def _append(chain, layer, width: int, axes=None, open_for: str = ""):
    import dataclasses
    return dataclasses.replace(chain, layers=chain.layers + (layer,), width=width, axes=axes or chain.axes,
                               open=open_for, origin=(), keys=chain.keys + ((),))


def read_conv(reader, operands, attributes):
    from gru_engine.spec import Layer

    chain = _channels_first(reader, operands[0])
    w = reader.constant(operands[1], "the Conv weight")
    groups = int(attributes.get("group", 1))
    if w.dtype != np.float32 or w.ndim != 3 or groups < 1 or w.shape[1] * groups != chain.width:
        reader.malformed(f"the weight is {w.dtype} {w.shape} with group {groups}; a Conv over {chain.width} channels "
                         f"takes float32 (filters, {chain.width} / group, kernel_size)")
    filters, _, kernel_size = w.shape
    strides, dilation = _one(reader, attributes, "strides"), _one(reader, attributes, "dilations")
    if list(attributes.get("kernel_shape", [kernel_size])) != [kernel_size]:
        reader.malformed(f"kernel_shape {attributes['kernel_shape']} disagrees with the weight's {kernel_size}")
    if strides > 1 and dilation > 1:
        reader.fail("strides > 1 with dilations > 1 has no Keras Conv1D equivalent")
    size = (kernel_size - 1) * dilation + 1
    weights = {"kernel": np.ascontiguousarray(w.transpose(2, 1, 0))}
    if len(operands) > 2 and operands[2] is not None:
        bias = reader.constant(operands[2], "the Conv bias")
        if bias.dtype != np.float32 or bias.shape != (filters,):
            reader.malformed(f"the bias is {bias.dtype} {bias.shape}; expected float32 ({filters},)")
        weights["bias"] = bias
    config = {"filters": int(filters), "kernel_size": int(kernel_size), "strides": strides,
              "padding": _keras_padding(reader, attributes, size, strides, causal=True), "dilation_rate": dilation,
              "groups": groups, "activation": "linear", "use_bias": "bias" in weights}
    return _append(chain, Layer("conv1d", reader.layer_name(), config, weights), int(filters), open_for="bias")


def _read_pool(reader, operands, attributes, kind: str):
    from gru_engine.spec import Layer

    chain = _channels_first(reader, operands[0])
    size, strides = _one(reader, attributes, "kernel_shape"), _one(reader, attributes, "strides")
    if attributes.get("ceil_mode", 0) or _one(reader, attributes, "dilations") != 1:
        reader.fail("ceil_mode or dilations; Keras pooling windows have neither")
    padding = _keras_padding(reader, attributes, size, strides, causal=False)
    if kind == "average_pooling1d" and padding != "valid" and attributes.get("count_include_pad", 0):
        reader.fail("count_include_pad=1; Keras averages only the steps inside the input")
    config = {"pool_size": size, "strides": strides, "padding": padding}
    return _append(chain, Layer(kind, reader.layer_name(), config), chain.width)


def _read_global_pool(reader, operands, kind: str):
    from gru_engine.spec import Layer

    labels = _labels()
    chain = _channels_first(reader, operands[0])
    return _append(chain, Layer(kind, reader.layer_name(), {}), chain.width,
                   axes=(labels.BATCH, labels.FEATURE, labels.ONE))


def read_batch_normalization(reader, operands, attributes):
    from gru_engine.spec import Layer

    labels = _labels()
    chain = reader.chain(operands[0])
    if chain.axes not in ((labels.BATCH, labels.FEATURE, labels.TIME), (labels.BATCH, labels.FEATURE)):
        reader.fail(f"normalizes axes ({', '.join(chain.axes)}); BatchNormalization reads (batch, channels, ...)")
    if attributes.get("training_mode", 0):
        reader.fail("training_mode=1; only the inference form is supported")
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    weights = {}
    for name, operand in zip(names, operands[1:5]):
        array = reader.constant(operand, f"the {name}")
        if array.dtype != np.float32 or array.shape != (chain.width,):
            reader.malformed(f"the {name} is {array.dtype} {array.shape}; expected float32 ({chain.width},)")
        weights[name] = array
    config = {"epsilon": float(attributes.get("epsilon", 1e-5)), "center": True, "scale": True}
    return _append(chain, Layer("batch_normalization", reader.layer_name(), config, weights), chain.width)


def read_max_pool(reader, operands, attributes):
    return _read_pool(reader, operands, attributes, "max_pooling1d")


def read_average_pool(reader, operands, attributes):
    return _read_pool(reader, operands, attributes, "average_pooling1d")


def read_global_max_pool(reader, operands, attributes):
    return _read_global_pool(reader, operands, "global_max_pooling1d")


def read_global_average_pool(reader, operands, attributes):
    return _read_global_pool(reader, operands, "global_average_pooling1d")
