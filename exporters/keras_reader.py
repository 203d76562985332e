"""Keras model -> ModelSpec (and -> bundle). Imports TensorFlow/Keras only when called."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gru_engine import bundle, frontends
from gru_engine.errors import BundleError, UnsupportedModelError
from gru_engine.spec import (DENSE_ACTIVATIONS, MERGE_MODES, RECURRENT_ACTIVATIONS, RECURRENT_FAMILIES, Layer,
                             ModelSpec, sample_input, validate)

SUPPORTED = ("InputLayer, Masking, GRU, LSTM, SimpleRNN, Bidirectional(GRU, LSTM or SimpleRNN), Dense (per time "
             "step on sequences), Dropout, Conv1D, MaxPooling1D, AveragePooling1D, GlobalAveragePooling1D, "
             "GlobalMaxPooling1D, BatchNormalization (channels_last), in a Sequential model or a functional "
             "single chain")
SELF_CHECK_BATCH = 2
SELF_CHECK_STEPS = 7


def load_keras(model_or_path):
    """A Keras model object, or one loaded (without its optimizer) from a .keras / .h5 file."""
    import keras

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such Keras model file")
        return keras.models.load_model(path, compile=False)
    return model_or_path


def _refuse(layer, message: str):
    raise UnsupportedModelError(f"layer '{layer.name}' ({type(layer).__name__}): {message}. "
                                f"gru-engine supports: {SUPPORTED}")


def _activation_name(layer, function, allowed) -> str:
    """The name of a built-in activation, by identity: a custom function is refused whatever its name."""
    import keras

    for name in allowed:
        if keras.activations.get(name) is function:
            return name
    _refuse(layer, f"activation {getattr(function, '__name__', function)!r} is not supported; "
                   f"use one of {list(allowed)}")


def _check_dtype(layer) -> None:
    # The engine computes in float32; a float16 or float64 layer would not match within the parity tolerance.
    if layer.compute_dtype != "float32" or layer.variable_dtype not in ("float32", None):
        _refuse(layer, f"dtype policy {layer.dtype_policy.name!r}; gru-engine computes in float32, "
                       "so build the layer with dtype='float32'")


def _recurrent_kind(layer) -> str | None:
    """The spec kind of a Keras GRU, LSTM or SimpleRNN layer (exact classes: a subclass may compute
    anything), else None."""
    import keras

    for kind, family in RECURRENT_FAMILIES.items():
        if type(layer) is getattr(keras.layers, family.keras_class):
            return kind
    return None


def _recurrent(layer) -> tuple[str, dict, dict]:
    """(kind, config, weights) of a GRU, LSTM or SimpleRNN layer. LSTM's unit_forget_bias only
    initialises the bias, so nothing of it is needed to run the layer."""
    kind = _recurrent_kind(layer)
    if kind is None:
        _refuse(layer, "only GRU, LSTM and SimpleRNN layers are supported inside Bidirectional")
    _check_dtype(layer)
    config = layer.get_config()
    options = {
        "units": int(config["units"]),
        "activation": _activation_name(layer, layer.cell.activation, RECURRENT_ACTIVATIONS),
        "use_bias": bool(config["use_bias"]),
        "return_sequences": bool(config["return_sequences"]),
        "return_state": bool(config["return_state"]),
        "go_backwards": bool(config["go_backwards"]),
        "zero_output_for_mask": bool(layer.zero_output_for_mask),
        "stateful": bool(config["stateful"]),
    }
    keys = RECURRENT_FAMILIES[kind].config_keys
    if "recurrent_activation" in keys:
        options["recurrent_activation"] = _activation_name(layer, layer.cell.recurrent_activation,
                                                           RECURRENT_ACTIVATIONS)
    if "reset_after" in keys:
        options["reset_after"] = bool(config["reset_after"])
    names = ["kernel", "recurrent_kernel"] + (["bias"] if options["use_bias"] else [])
    weights = {name: np.asarray(value, np.float32) for name, value in zip(names, layer.get_weights())}
    return kind, options, weights


def _frontend(layer) -> Layer:
    """A Conv1D, pooling or BatchNormalization layer (the caller checked its class)."""
    import keras

    name = next(kind for kind, keras_name in frontends.KERAS_CLASS_NAMES.items()
                if keras_name == type(layer).__name__)
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        _refuse(layer, "data_format 'channels_first'; gru-engine reads (batch, time, channels): use channels_last")
    if name == "conv1d":
        config = {"filters": int(layer.filters), "kernel_size": int(layer.kernel_size[0]),
                  "strides": int(layer.strides[0]), "padding": layer.padding,
                  "dilation_rate": int(layer.dilation_rate[0]), "groups": int(layer.groups),
                  "activation": _activation_name(layer, layer.activation, frontends.CONV_ACTIVATIONS),
                  "use_bias": bool(layer.use_bias)}
        weights = {"kernel": layer.kernel}
        if config["use_bias"]:
            weights["bias"] = layer.bias
    elif name in frontends.POOLING_KINDS:
        config = {"pool_size": int(layer.pool_size[0]), "strides": int(layer.strides[0]), "padding": layer.padding}
        weights = {}
    elif name in frontends.GLOBAL_POOLING_KINDS:
        if layer.keepdims:
            _refuse(layer, "keepdims=True is not supported; use keepdims=False")
        config, weights = {}, {}
    else:
        if layer.axis not in (-1, 2) or layer.renorm:
            _refuse(layer, "only axis=-1 (the channels) without renorm is supported")
        config = {"epsilon": float(layer.epsilon), "center": bool(layer.center), "scale": bool(layer.scale)}
        weights = {"moving_mean": layer.moving_mean, "moving_variance": layer.moving_variance}
        if config["scale"]:
            weights["gamma"] = layer.gamma
        if config["center"]:
            weights["beta"] = layer.beta
    return Layer(name, layer.name, config,
                 {key: np.asarray(keras.ops.convert_to_numpy(value), np.float32) for key, value in weights.items()})


def _layer(layer) -> Layer | None:
    import keras

    kind = type(layer)
    if kind in (keras.layers.InputLayer, keras.layers.Dropout):
        return None
    _check_dtype(layer)
    if kind is keras.layers.Masking:
        return Layer("masking", layer.name, {"mask_value": float(layer.mask_value)})
    if kind is keras.layers.Dense:
        config = {"units": int(layer.units), "activation": _activation_name(layer, layer.activation, DENSE_ACTIVATIONS),
                  "use_bias": bool(layer.use_bias)}
        names = ["kernel"] + (["bias"] if config["use_bias"] else [])
        return Layer("dense", layer.name, config,
                     {name: np.asarray(value, np.float32) for name, value in zip(names, layer.get_weights())})
    if kind.__name__ in frontends.KERAS_CLASS_NAMES.values() and kind is getattr(keras.layers, kind.__name__):
        return _frontend(layer)
    if _recurrent_kind(layer):
        kind, config, weights = _recurrent(layer)
        return Layer(kind, layer.name, config, weights)
    if kind is keras.layers.Bidirectional:
        if layer.merge_mode not in MERGE_MODES:
            _refuse(layer, f"merge_mode {layer.merge_mode!r} is not supported; use one of {list(MERGE_MODES)}")
        wrapped, forward, forward_weights = _recurrent(layer.forward_layer)
        backward_kind, backward, backward_weights = _recurrent(layer.backward_layer)
        if backward_kind != wrapped:
            _refuse(layer, f"its forward layer is {wrapped} and its backward layer {backward_kind}; "
                           "both directions must be the same kind of layer")
        # Bidirectional re-aligns the backward outputs and forces zero_output_for_mask itself.
        weights = {f"forward.{k}": v for k, v in forward_weights.items()}
        weights.update({f"backward.{k}": v for k, v in backward_weights.items()})
        config = {"merge_mode": layer.merge_mode, "forward": forward, "backward": backward}
        if wrapped != "gru":  # absent for GRU, so that older gru-engine versions read GRU bundles
            config["layer"] = wrapped
        return Layer("bidirectional", layer.name, config, weights)
    _refuse(layer, "this layer type is not supported")


def _check_chain(model) -> None:
    """Functional models must be one chain: each layer fed by the previous one's (first) output."""
    import keras

    if isinstance(model, keras.Sequential):
        return
    if len(model.inputs) != 1:
        raise UnsupportedModelError(f"the model has {len(model.inputs)} inputs; gru-engine runs single-input chains")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]._keras_history.operation
    for layer in layers:
        if len(layer._inbound_nodes) != 1:
            _refuse(layer, "the layer is called more than once (shared layers are not a single chain)")
        # Positional arguments only: Keras passes the propagated mask as a keyword input.
        inputs = layer._inbound_nodes[0].arguments.args
        if len(inputs) != 1 or inputs[0]._keras_history.operation is not previous \
                or inputs[0]._keras_history.tensor_index != 0:
            _refuse(layer, "its input is not the previous layer's first output (branches and merges are not "
                           "supported)")
        previous = layer
    if any(output._keras_history.operation is not layers[-1] for output in model.outputs) or [
            output._keras_history.tensor_index for output in model.outputs] != list(range(len(model.outputs))):
        raise UnsupportedModelError("the model's outputs must be exactly the last layer's outputs, in order")


def _self_check_input(model, spec: ModelSpec) -> np.ndarray:
    """A small deterministic input of the model's shape (fixed batch or time where Keras fixes them)."""
    shape = model.inputs[0].shape
    steps = shape[1] or max(SELF_CHECK_STEPS, frontends.min_steps(spec))
    return sample_input(spec, shape[0] or SELF_CHECK_BATCH, steps, np.random.default_rng(0))


def reset_states(model) -> None:
    """Zero the carries of every stateful recurrent layer (also inside Bidirectional)."""
    for layer in model.layers:
        for inner in (layer, getattr(layer, "forward_layer", None), getattr(layer, "backward_layer", None)):
            if inner is not None and getattr(inner, "stateful", False):
                inner.reset_state()


def keras_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    """The Keras model's outputs for x, as a list of float32 arrays; stateful layers start from zero."""
    reset_states(model)
    outputs = model(x, training=False)
    reset_states(model)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(output, np.float32) for output in outputs]


def read_keras(model_or_path) -> ModelSpec:
    """Turn a Keras model (object or file) into a validated ModelSpec with a self-check."""
    import keras

    model = load_keras(model_or_path)
    shape = model.inputs[0].shape
    if len(shape) != 3 or shape[-1] is None:
        raise UnsupportedModelError(f"the model input has shape {shape}; gru-engine needs (batch, time, features) "
                                    "with a fixed feature count")
    _check_chain(model)
    layers = [layer for layer in (_layer(keras_layer) for keras_layer in model.layers) if layer is not None]
    spec = ModelSpec(int(shape[-1]), layers,
                     {"framework": "keras", "version": keras.__version__, "backend": keras.backend.backend()})
    _validate_as_keras(spec)
    spec.self_check_input = _self_check_input(model, spec)
    spec.self_check_outputs = keras_outputs(model, spec.self_check_input)
    _validate_as_keras(spec)
    return spec


def _validate_as_keras(spec: ModelSpec) -> None:
    """validate(), with its complaints about a chain Keras built reported as unsupported Keras layers."""
    try:
        validate(spec)
    except BundleError as exc:
        message = str(exc)
        index = re.match(r"layer (\d+): ", message)
        if index:
            layer = spec.layers[int(index.group(1))]
            message = f"layer '{layer.name}' ({layer.kind}): {message[index.end():]}"
        raise UnsupportedModelError(f"{message}. gru-engine supports: {SUPPORTED}") from None


def export_bundle(model_or_path, out_path) -> Path:
    """Write a Keras model (object or .keras/.h5 file) as a self-checking bundle.

    The engine replays the self-check before anything is written, so a model it cannot reproduce
    is refused here rather than producing a bundle that can never load.
    """
    from gru_engine.runtime import Model

    spec = read_keras(model_or_path)
    try:
        bundle.self_check(Model(spec), "the exported model")
    except BundleError as exc:
        raise UnsupportedModelError(f"{exc}. This is a gru-engine limitation or bug; please report it") from None
    return bundle.save(spec, out_path)
