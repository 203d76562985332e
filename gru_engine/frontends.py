"""The convolutional front-end kinds of a ``ModelSpec``: configuration, weights, shapes, time axis.

Keras names and layouts, channels_last (the time axis is 1, channels last):

- ``conv1d``:  config ``filters, kernel_size, strides, padding ('valid' | 'same' | 'causal'),
               dilation_rate, groups, activation, use_bias``; weights ``kernel (kernel_size,
               input_dim / groups, filters)``, ``bias (filters,)`` when use_bias.
               y[t, f] = activation(bias[f] + sum_k x[t * strides + k * dilation_rate - pad_left,
               group(f) channels] @ kernel[k, :, f]), x zero outside [0, time).
- ``max_pooling1d``, ``average_pooling1d``: config ``pool_size, strides, padding ('valid' |
               'same')``; no weights. Padded positions never count (as TensorFlow pools).
- ``global_average_pooling1d``: config ``{}``; the mean over time of the unmasked steps.
- ``global_max_pooling1d``: config ``{}``; the max over every step (Keras ignores the mask here).
- ``batch_normalization``: config ``epsilon, center, scale`` (axis -1, inference form); weights
               ``gamma (C,)`` when scale, ``beta (C,)`` when center, ``moving_mean (C,)``,
               ``moving_variance (C,)``. y = (x - moving_mean) / sqrt(moving_variance + epsilon)
               * gamma + beta.

'same' pads ``max((out - 1) * strides + window - time, 0)`` steps, the smaller half on the left,
as TensorFlow does; 'causal' pads ``window - 1`` steps on the left.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .layer_checks import LayerShape, check_keys, check_units, fail
from .kernels import conv as conv_kernels

CONV_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")
CONV_PADDINGS = ("valid", "same", "causal")
POOL_PADDINGS = ("valid", "same")
POOLING_KINDS = ("max_pooling1d", "average_pooling1d")
GLOBAL_POOLING_KINDS = ("global_average_pooling1d", "global_max_pooling1d")
KINDS = ("conv1d",) + POOLING_KINDS + GLOBAL_POOLING_KINDS + ("batch_normalization",)
KERAS_CLASS_NAMES = {"conv1d": "Conv1D", "max_pooling1d": "MaxPooling1D", "average_pooling1d": "AveragePooling1D",
                     "global_average_pooling1d": "GlobalAveragePooling1D",
                     "global_max_pooling1d": "GlobalMaxPooling1D", "batch_normalization": "BatchNormalization"}
# Kernel sizes, strides, dilations and pool sizes beyond this are refused before anything is allocated.
MAX_WINDOW = 4096

CONV1D_CONFIG_KEYS = {"filters": int, "kernel_size": int, "strides": int, "padding": str, "dilation_rate": int,
                      "groups": int, "activation": str, "use_bias": bool}
POOLING_CONFIG_KEYS = {"pool_size": int, "strides": int, "padding": str}
BATCH_NORMALIZATION_CONFIG_KEYS = {"epsilon": float, "center": bool, "scale": bool}


def padding_code(padding: str) -> int:
    """The kernels' code for a padding name."""
    return {"valid": conv_kernels.PAD_VALID, "same": conv_kernels.PAD_SAME, "causal": conv_kernels.PAD_CAUSAL}[padding]


def window(layer) -> tuple[int, int, str] | None:
    """(window length in steps, strides, padding) of a layer that changes the time axis, else None."""
    config = layer.config
    if layer.kind == "conv1d":
        return (config["kernel_size"] - 1) * config["dilation_rate"] + 1, config["strides"], config["padding"]
    if layer.kind in POOLING_KINDS:
        return config["pool_size"], config["strides"], config["padding"]
    return None


def layer_steps(layer, steps: int) -> int:
    """Time steps a layer returns for ``steps`` input steps (< 1: the input is too short for it)."""
    shape = window(layer)
    if shape is not None:
        size, strides, padding = shape
        return int(conv_kernels.window_rows(steps, size, strides, padding_code(padding)))
    if layer.kind in GLOBAL_POOLING_KINDS:
        return 1
    return steps


def too_short(spec, steps: int) -> str | None:
    """Why an input of ``steps`` time steps is too short for the chain, or None if it is not."""
    for layer in spec.layers:
        out = layer_steps(layer, steps)
        if out < 1:
            size = window(layer)[0]
            return (f"layer '{layer.name}' ({KERAS_CLASS_NAMES[layer.kind]}, padding 'valid') needs at least "
                    f"{size} time steps at its input, and gets {steps}: give the model longer sequences")
        steps = out
    return None


def output_steps(spec, steps: int) -> int:
    """Time steps the chain's last sequence has for ``steps`` input steps (the input must be long enough)."""
    for layer in spec.layers:
        steps = layer_steps(layer, steps)
    return steps


def min_steps(spec) -> int:
    """The fewest input steps the chain accepts: walked back from one step out of its last layer."""
    steps = 1
    for layer in reversed(spec.layers):
        shape = window(layer)
        if shape is not None:
            size, strides, padding = shape
            steps = (steps - 1) * strides + (size if padding == "valid" else 1)
    return steps


def not_streamable(layer) -> str | None:
    """Why a front-end layer cannot run one step at a time (a phrase after its name), or None."""
    if layer.kind == "conv1d":
        if layer.config["padding"] != "causal":
            return (f"has padding '{layer.config['padding']}', so its output at time t depends on later inputs "
                    "(only padding 'causal' streams)")
        if layer.config["strides"] != 1:
            return f"has strides {layer.config['strides']}, so it emits fewer steps than it reads (only strides 1 streams)"
        return None
    if layer.kind in POOLING_KINDS + GLOBAL_POOLING_KINDS:
        return "pools several time steps into one output"
    return None


def lengths_blocker(spec) -> str | None:
    """Why ``predict(lengths=)`` cannot mask this chain's padding, or None: the mask needs each time step
    to stay one row with no later input in it (causal Conv1D of strides 1; global pooling honours it)."""
    for layer in spec.layers:
        reason = None if layer.kind in GLOBAL_POOLING_KINDS else not_streamable(layer)
        if reason:
            return (f"lengths= cannot be honoured: layer '{layer.name}' ({KERAS_CLASS_NAMES[layer.kind]}) {reason}, "
                    "so padded steps leak into the valid ones; run each sample at its own length instead "
                    "(predict(x[s:s + 1, :length]))")
    return None


def history_steps(layer) -> int:
    """Past input steps a streamed causal Conv1D keeps: (kernel_size - 1) * dilation_rate."""
    return (layer.config["kernel_size"] - 1) * layer.config["dilation_rate"]


def weight_shapes(layer, input_dim: int) -> dict[str, tuple[int, ...]]:
    config = layer.config
    if layer.kind == "conv1d":
        shapes = {"kernel": (config["kernel_size"], input_dim // config["groups"], config["filters"])}
        if config["use_bias"]:
            shapes["bias"] = (config["filters"],)
        return shapes
    if layer.kind == "batch_normalization":
        shapes = {"gamma": (input_dim,)} if config["scale"] else {}
        if config["center"]:
            shapes["beta"] = (input_dim,)
        return dict(shapes, moving_mean=(input_dim,), moving_variance=(input_dim,))
    return {}


def _check_window(index: int, config: dict, field: str) -> None:
    if not 1 <= config[field] <= MAX_WINDOW:
        fail(index, f"'{field}' is {config[field]}; it must be between 1 and {MAX_WINDOW}")


def trace(index: int, layer, input_dim: int, is_sequence: bool) -> Any:
    """Check a front-end layer's configuration; return its ``LayerShape``."""
    config, kind = layer.config, layer.kind
    if kind == "batch_normalization":
        check_keys(index, config, BATCH_NORMALIZATION_CONFIG_KEYS, kind)
        if not (np.isfinite(config["epsilon"]) and 0 < config["epsilon"] < 1):
            fail(index, f"batch_normalization 'epsilon' is {config['epsilon']!r}; it must be in (0, 1)")
        parameters = sum(int(np.prod(shape)) for shape in weight_shapes(layer, input_dim).values())
        return LayerShape(input_dim, input_dim, is_sequence, is_sequence, (), parameters)
    if not is_sequence:
        fail(index, f"{kind} needs a sequence input; set return_sequences=True on the layer before it")
    if kind in GLOBAL_POOLING_KINDS:
        if config != {}:
            fail(index, f"{kind} config must be empty, got {config!r:.80}")
        return LayerShape(input_dim, input_dim, True, False, (), 0)
    if kind in POOLING_KINDS:
        check_keys(index, config, POOLING_CONFIG_KEYS, kind)
        for field in ("pool_size", "strides"):
            _check_window(index, config, field)
        if config["padding"] not in POOL_PADDINGS:
            fail(index, f"{kind} 'padding' is {config['padding']!r}; supported: {list(POOL_PADDINGS)}")
        return LayerShape(input_dim, input_dim, True, True, (), 0)
    check_keys(index, config, CONV1D_CONFIG_KEYS, kind)
    check_units(index, config["filters"], "filters")
    for field in ("kernel_size", "strides", "dilation_rate"):
        _check_window(index, config, field)
    if config["padding"] not in CONV_PADDINGS:
        fail(index, f"conv1d 'padding' is {config['padding']!r}; supported: {list(CONV_PADDINGS)}")
    if config["activation"] not in CONV_ACTIVATIONS:
        fail(index, f"conv1d 'activation' is {config['activation']!r}; "
                    f"supported: {list(CONV_ACTIVATIONS)}")
    if config["strides"] > 1 and config["dilation_rate"] > 1:
        fail(index, "conv1d cannot combine strides > 1 with dilation_rate > 1 (Keras refuses it too)")
    groups = config["groups"]
    if not 1 <= groups <= input_dim or input_dim % groups or config["filters"] % groups:
        fail(index, f"conv1d 'groups' is {groups}; it must divide both the input channels "
                    f"({input_dim}) and filters ({config['filters']})")
    parameters = sum(int(np.prod(shape)) for shape in weight_shapes(layer, input_dim).values())
    return LayerShape(input_dim, config["filters"], True, True, (), parameters)


def check_weights(index: int, layer) -> None:
    """Value checks beyond shapes: a BatchNormalization's variance plus epsilon must be positive."""
    if layer.kind == "batch_normalization":
        if not (layer.weights["moving_variance"].astype(np.float64) + layer.config["epsilon"] > 0).all():
            fail(index, "batch_normalization 'moving_variance' + epsilon must be positive")


def batch_norm_affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNormalization as y = x * scale + shift, per channel, computed in float64 as TensorFlow does
    it in float32 (scale = gamma / sqrt(variance + epsilon), shift = beta - mean * scale)."""
    weights, config = layer.weights, layer.config
    channels = weights["moving_mean"].shape[0]
    gamma = weights["gamma"].astype(np.float64) if config["scale"] else np.ones(channels)
    beta = weights["beta"].astype(np.float64) if config["center"] else np.zeros(channels)
    scale = gamma / np.sqrt(weights["moving_variance"].astype(np.float64) + config["epsilon"])
    return scale, beta - weights["moving_mean"].astype(np.float64) * scale


def _folds(previous, layer) -> bool:
    """Whether a BatchNormalization folds exactly into the layer before it: a Conv1D or Dense whose
    output it scales before any activation (y = (x @ W + b) * scale + shift = x @ (W * scale) +
    (b * scale + shift), which only reorders float32 roundings, well inside the parity tolerance)."""
    return layer.kind == "batch_normalization" and previous.kind in ("conv1d", "dense") \
        and previous.config["activation"] == "linear"


def fold_batch_norms(layers, shapes) -> list:
    """(layer, shape) pairs with each BatchNormalization that follows a linear Conv1D or Dense folded
    into that layer's kernel and bias (the layer then has a bias); other layers unchanged."""
    folded = []
    for index, (layer, shape) in enumerate(zip(layers, shapes)):
        if folded and _folds(layers[index - 1], layer):
            previous, previous_shape = folded.pop()
            scale, shift = batch_norm_affine(layer)
            kernel = previous.weights["kernel"].astype(np.float64) * scale  # the last axis: outputs
            bias = previous.weights["bias"].astype(np.float64) if previous.config["use_bias"] else 0.0
            layer = dataclasses.replace(previous, config=dict(previous.config, use_bias=True), weights={
                "kernel": kernel.astype(np.float32), "bias": (bias * scale + shift).astype(np.float32)})
            shape = dataclasses.replace(previous_shape, output_is_sequence=shape.output_is_sequence)
        folded.append((layer, shape))
    return folded
