"""Keras models for the tests, built from fixed seeds: the parity matrix and a random-config drawer.

A model is described by plain data (a list of layer dicts), so parametrized tests get readable ids
and hypothesis can draw descriptions. Weights are re-drawn with non-zero biases so every parameter
matters in a comparison.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

AIRLINE = [{"kind": "gru", "units": 50, "return_sequences": True}, {"kind": "gru", "units": 50},
           {"kind": "dense", "units": 1}]


KERAS_CLASSES = {"gru": "GRU", "lstm": "LSTM", "simple_rnn": "SimpleRNN"}


def _recurrent(keras, kind: str, spec: dict):
    options = {key: value for key, value in spec.items() if key not in ("kind", "merge_mode", "layer")}
    return getattr(keras.layers, KERAS_CLASSES[kind])(**options)


FRONTEND_CLASSES = {"conv1d": "Conv1D", "max_pooling1d": "MaxPooling1D", "average_pooling1d": "AveragePooling1D",
                    "global_average_pooling1d": "GlobalAveragePooling1D",
                    "global_max_pooling1d": "GlobalMaxPooling1D", "batch_normalization": "BatchNormalization"}



def build_model(layers: list[dict], features: int, seed: int = 0, steps: int | None = None, batch=None,
                functional: bool = False):
    """Build a Keras model from a description; weights drawn from ``seed``."""
    import keras

    keras.utils.set_random_seed(seed)
    built = []
    for spec in layers:
        kind = spec["kind"]
        options = {key: value for key, value in spec.items() if key != "kind"}
        if kind in KERAS_CLASSES:
            built.append(_recurrent(keras, kind, spec))
        elif kind == "bidirectional":
            built.append(keras.layers.Bidirectional(_recurrent(keras, spec.get("layer", "gru"), spec),
                                                    merge_mode=spec.get("merge_mode", "concat")))
        elif kind == "dense":
            built.append(keras.layers.Dense(**options))
        elif kind == "masking":
            built.append(keras.layers.Masking(**options))
        elif kind == "dropout":
            built.append(keras.layers.Dropout(**options))
        elif kind in FRONTEND_CLASSES:
            built.append(getattr(keras.layers, FRONTEND_CLASSES[kind])(**options))
        else:
            raise ValueError(f"unknown layer kind {kind}")
    inputs = keras.Input((steps, features), batch_size=batch)
    # Sequential cannot end in a layer with several outputs.
    if functional or any(spec.get("return_state") or spec.get("merge_mode", "x") is None for spec in layers):
        x = inputs
        for layer in built:
            x = layer(x)
        model = keras.Model(inputs, x)
    else:
        model = keras.Sequential([inputs] + built)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # a variance is positive
            layer.moving_variance.assign(np.abs(layer.moving_variance.numpy()) + np.float32(0.5))
    return model


def random_input(batch: int, steps: int, features: int, seed: int = 1, mask_value=None) -> np.ndarray:
    """Standard normal input; with ``mask_value``, some time steps of some samples are padding."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, steps, features)).astype(np.float32)
    if mask_value is not None:
        padded = rng.random((batch, steps)) < 0.3
        x[padded] = mask_value
    return x


def _matrix() -> dict[str, list[dict]]:
    cases = {"airline": AIRLINE}
    for act in ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear"):
        for rec in ("sigmoid", "hard_sigmoid", "tanh"):
            cases[f"act-{act}-rec-{rec}"] = [{"kind": "gru", "units": 7, "activation": act,
                                              "recurrent_activation": rec, "return_sequences": True}]
    for reset_after in (True, False):
        for use_bias in (True, False):
            for go_backwards in (False, True):
                name = f"reset_after-{reset_after}-bias-{use_bias}-back-{go_backwards}"
                cases[name] = [{"kind": "gru", "units": 9, "reset_after": reset_after, "use_bias": use_bias,
                                "go_backwards": go_backwards, "return_sequences": True},
                               {"kind": "gru", "units": 5, "reset_after": reset_after, "use_bias": use_bias,
                                "go_backwards": go_backwards}]
    cases["return-state"] = [{"kind": "gru", "units": 6, "return_state": True}]
    cases["return-state-sequences"] = [{"kind": "gru", "units": 6, "return_state": True, "return_sequences": True}]
    cases["units-1"] = [{"kind": "gru", "units": 1}, {"kind": "dense", "units": 1}]
    cases["units-64"] = [{"kind": "gru", "units": 64, "return_sequences": True}, {"kind": "dense", "units": 3}]
    for merge in ("concat", "sum", "mul", "ave"):
        cases[f"bidirectional-{merge}"] = [
            {"kind": "bidirectional", "units": 6, "merge_mode": merge, "return_sequences": True},
            {"kind": "bidirectional", "units": 4, "merge_mode": merge, "reset_after": False}]
    cases["bidirectional-none"] = [{"kind": "bidirectional", "units": 5, "merge_mode": None}]
    cases["bidirectional-state"] = [{"kind": "bidirectional", "units": 5, "return_state": True}]
    cases["masking"] = [{"kind": "masking", "mask_value": 0.0}, {"kind": "gru", "units": 8, "return_sequences": True},
                        {"kind": "gru", "units": 4}]
    cases["masking-sequences-dense"] = [
        {"kind": "masking", "mask_value": -1.0}, {"kind": "gru", "units": 8, "return_sequences": True},
        {"kind": "dense", "units": 3, "activation": "tanh"}, {"kind": "gru", "units": 4, "return_sequences": True}]
    cases["masking-backwards"] = [{"kind": "masking", "mask_value": 0.0},
                                  {"kind": "gru", "units": 5, "go_backwards": True, "return_sequences": True}]
    cases["masking-bidirectional"] = [{"kind": "masking", "mask_value": 0.0},
                                      {"kind": "bidirectional", "units": 5, "return_sequences": True},
                                      {"kind": "bidirectional", "units": 3, "merge_mode": "sum"}]
    for act in ("linear", "relu", "sigmoid", "tanh", "softmax"):
        cases[f"dense-{act}"] = [{"kind": "gru", "units": 8, "return_sequences": True},
                                 {"kind": "dense", "units": 4, "activation": act},
                                 {"kind": "dropout", "rate": 0.5}, {"kind": "gru", "units": 3},
                                 {"kind": "dense", "units": 2, "activation": act, "use_bias": act != "relu"}]
    return cases


PARITY_MATRIX = _matrix()
ACTIVATIONS = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")
RECURRENT_ACTIVATIONS = ("sigmoid", "hard_sigmoid", "tanh")


def _family_matrix() -> dict[str, list[dict]]:
    """LSTM and SimpleRNN over GRU's option space, options combined into fewer models (each Keras
    model costs seconds to build and export), and mixed chains."""
    cases = {}
    for kind in ("lstm", "simple_rnn"):
        def layer(units, **options):
            return {"kind": kind, "units": units, **options}

        def chain(*layers):  # every layer but the last returns sequences
            return [dict(spec, return_sequences=True) for spec in layers[:-1]] + [layers[-1]]

        # Every activation, under every recurrent activation for LSTM: one layer per activation.
        for rec in RECURRENT_ACTIVATIONS if kind == "lstm" else (None,):
            extra = {"recurrent_activation": rec} if rec else {}
            name = f"{kind}-activations" + (f"-rec-{rec}" if rec else "")
            cases[name] = chain(*(layer(5, activation=act, **extra) for act in ACTIVATIONS))
        cases[f"{kind}-bias-back"] = chain(layer(9, use_bias=True, go_backwards=True),
                                          layer(5, use_bias=False, go_backwards=False))
        cases[f"{kind}-nobias-back"] = chain(layer(9, use_bias=False, go_backwards=True),
                                            layer(5, use_bias=True, go_backwards=True))
        cases[f"{kind}-return-state"] = [layer(6, return_state=True)]
        cases[f"{kind}-return-state-sequences"] = [layer(6, return_state=True, return_sequences=True)]
        cases[f"{kind}-units-1"] = [layer(1), {"kind": "dense", "units": 1}]
        cases[f"{kind}-units-64"] = [layer(64, return_sequences=True), {"kind": "dense", "units": 3}]
        bidirectional = {"kind": "bidirectional", "layer": kind}
        cases[f"{kind}-bidirectional-concat-sum"] = [dict(bidirectional, units=6, return_sequences=True),
                                                    dict(bidirectional, units=4, merge_mode="sum")]
        cases[f"{kind}-bidirectional-mul-ave"] = [dict(bidirectional, units=6, merge_mode="mul", return_sequences=True),
                                                 dict(bidirectional, units=4, merge_mode="ave")]
        cases[f"{kind}-bidirectional-none"] = [dict(bidirectional, units=5, merge_mode=None)]
        cases[f"{kind}-bidirectional-state"] = [dict(bidirectional, units=5, return_state=True)]
        cases[f"{kind}-masking"] = [{"kind": "masking", "mask_value": 0.0}, layer(8, return_sequences=True),
                                    {"kind": "dense", "units": 3, "activation": "tanh"}, layer(4)]
        cases[f"{kind}-masking-zero-output"] = [{"kind": "masking", "mask_value": 0.0},
                                                layer(5, return_sequences=True, zero_output_for_mask=True),
                                                layer(3, go_backwards=True, return_state=True)]
        cases[f"{kind}-masking-bidirectional"] = [{"kind": "masking", "mask_value": 0.0},
                                                  dict(bidirectional, units=5, return_sequences=True),
                                                  dict(bidirectional, units=3, merge_mode="sum")]
    cases["mixed-lstm-gru-dense"] = [{"kind": "lstm", "units": 8, "return_sequences": True},
                                     {"kind": "gru", "units": 6}, {"kind": "dense", "units": 2}]
    cases["mixed-bidirectional-lstm-simple_rnn"] = [
        {"kind": "bidirectional", "layer": "lstm", "units": 5, "return_sequences": True},
        {"kind": "simple_rnn", "units": 4}]
    cases["mixed-simple_rnn-dense-lstm-gru"] = [
        {"kind": "simple_rnn", "units": 7, "return_sequences": True}, {"kind": "dense", "units": 4},
        {"kind": "lstm", "units": 5, "return_sequences": True}, {"kind": "gru", "units": 3, "reset_after": False}]
    cases["mixed-masking-gru-bidirectional-simple_rnn"] = [
        {"kind": "masking", "mask_value": 0.0}, {"kind": "gru", "units": 5, "return_sequences": True},
        {"kind": "bidirectional", "layer": "simple_rnn", "units": 3, "return_sequences": True},
        {"kind": "lstm", "units": 2, "return_state": True}]
    return cases


# LSTM, SimpleRNN and mixed chains.
FAMILY_MATRIX = _family_matrix()


def uses_masking(layers: list[dict]) -> float | None:
    for spec in layers:
        if spec["kind"] == "masking":
            return spec["mask_value"]
    return None


def stateful(layers: list[dict]) -> list[dict]:
    """The same chain with every recurrent layer stateful."""
    return [dict(spec, stateful=True) if spec["kind"] in KERAS_CLASSES else spec for spec in layers]


def is_causal(layers: list[dict]) -> bool:
    return not any(spec["kind"] == "bidirectional" or spec.get("go_backwards") for spec in layers)


def unaligned(x) -> np.ndarray:
    """A read-only float32 copy of x whose data starts one byte past an element boundary, as
    ``np.frombuffer`` gives from an offset: the engine copies such input before a kernel reads it."""
    x = np.asarray(x, np.float32)
    raw = np.frombuffer(b"\0" + x.tobytes(), np.float32, count=x.size, offset=1).reshape(x.shape)
    if raw.flags.aligned:
        raise RuntimeError("numpy aligned a buffer read from an odd offset; this helper cannot build the case")
    return raw
