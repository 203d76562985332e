"""A slow, obviously-correct NumPy model of what Keras computes, for any ``ModelSpec``.

It shares nothing with the engine but the spec: float64 throughout, a plain Python loop over time,
each gate written out as in the Keras cells. GRU (gates z, r, h; ``kernel`` columns z | r | h):

    x_z = x_t @ W_z + bi_z          x_r = x_t @ W_r + bi_r          x_h = x_t @ W_h + bi_h
    z   = recurrent_activation(x_z + h @ U_z + br_z)
    r   = recurrent_activation(x_r + h @ U_r + br_r)
    reset_after=True:   hh = activation(x_h + r * (h @ U_h + br_h))
    reset_after=False:  hh = activation(x_h + (r * h) @ U_h)
    h'  = z * h + (1 - z) * hh

``bias`` is (2, 3H) = [bi; br] when reset_after, else (3H,) = bi with br = 0.

LSTM (gates i, f, c, o; ``kernel`` columns i | f | c | o; one bias b; carries h and c):

    i  = recurrent_activation(x_t @ W_i + h @ U_i + b_i)
    f  = recurrent_activation(x_t @ W_f + h @ U_f + b_f)
    g  = activation(x_t @ W_c + h @ U_c + b_c)
    o  = recurrent_activation(x_t @ W_o + h @ U_o + b_o)
    c' = f * c + i * g
    h' = o * activation(c')

SimpleRNN: h' = activation(x_t @ W + h @ U + b).

Masking follows Keras's ``backend.rnn``: a masked step keeps the carry, and its output is zero when
``zero_output_for_mask`` else the previous step's output (zero before the first step). The mask
travels unchanged (never reversed) through layers that return sequences and stops at the first
layer that does not.

Also here: ``random_spec`` (a spec with random weights and a self-check from this reference, for
tests that need no TensorFlow) and ``rounding_sensitivity`` (whether float32 parity is defined).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gru_engine.spec import (ACTIVATION_PARAMETERS, PARITY_ATOL, PARITY_RTOL, RECURRENT_FAMILIES, Layer, ModelSpec, trace_shapes,
                             weight_shapes)


def _sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -709 gives the right limit, 0
        return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


ACTIVATIONS = {
    "linear": lambda x: x,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    # Keras 3: relu6(x + 3) / 6 (Keras 2 used 0.2 * x + 0.5).
    "hard_sigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "relu": lambda x: np.maximum(x, 0.0),
    "softmax": _softmax,
}


# ONNX's RNN activations with their parameters (the ONNX operator's table), by the spec's names.
PARAMETRIC = {
    "hard_sigmoid": lambda x, a, b: np.clip(a * x + b, 0.0, 1.0),
    "affine": lambda x, a, b: a * x + b,
    "leaky_relu": lambda x, a, b: np.where(x >= 0, x, a * x),
    "thresholded_relu": lambda x, a, b: np.where(x > a, x, 0.0),
    "scaled_tanh": lambda x, a, b: a * np.tanh(b * x),
    "elu": lambda x, a, b: np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0.0))),
}
ACTIVATIONS.update({"softsign": lambda x: x / (1.0 + np.abs(x)), "softplus": lambda x: np.logaddexp(0.0, x)})


def _activation(config, field):
    """The activation ``field`` of a GRU config with its parameters, after its clip (if any)."""
    name = config[field]
    clip = config.get("clip")
    if name in PARAMETRIC:
        alpha, beta = ACTIVATION_PARAMETERS[name]
        alpha, beta = config.get(f"{field}_alpha", alpha), config.get(f"{field}_beta", beta)
        function = lambda x: PARAMETRIC[name](x, alpha, beta)  # noqa: E731
    else:
        function = ACTIVATIONS[name]
    return function if clip is None else (lambda x: function(np.clip(x, -clip, clip)))


def _gru_cell(config, weights):
    """The GRU step: (x_t (B, I), [h (B, H)]) -> (output, [h'])."""
    units = config["units"]
    activation = _activation(config, "activation")
    recurrent_activation = _activation(config, "recurrent_activation")
    kernel = weights["kernel"].astype(np.float64)                      # (I, 3H)
    recurrent_kernel = weights["recurrent_kernel"].astype(np.float64)  # (H, 3H)
    if not config["use_bias"]:
        input_bias = recurrent_bias = np.zeros(3 * units)
    elif config["reset_after"]:
        input_bias, recurrent_bias = weights["bias"].astype(np.float64)  # (3H,), (3H,)
    else:
        input_bias, recurrent_bias = weights["bias"].astype(np.float64), np.zeros(3 * units)
    z_, r_, h_ = slice(0, units), slice(units, 2 * units), slice(2 * units, 3 * units)

    def step(x_t, carries):
        (h,) = carries
        x_z = x_t @ kernel[:, z_] + input_bias[z_]
        x_r = x_t @ kernel[:, r_] + input_bias[r_]
        x_h = x_t @ kernel[:, h_] + input_bias[h_]
        z = recurrent_activation(x_z + h @ recurrent_kernel[:, z_] + recurrent_bias[z_])
        r = recurrent_activation(x_r + h @ recurrent_kernel[:, r_] + recurrent_bias[r_])
        if config["reset_after"]:
            hh = activation(x_h + r * (h @ recurrent_kernel[:, h_] + recurrent_bias[h_]))
        else:
            hh = activation(x_h + (r * h) @ recurrent_kernel[:, h_])
        new_h = z * h + (1.0 - z) * hh  # (B, H)
        return new_h, [new_h]
    return step


def _lstm_cell(config, weights):
    """The LSTM step: (x_t (B, I), [h, c] (B, H) each) -> (output h', [h', c'])."""
    units = config["units"]
    activation = ACTIVATIONS[config["activation"]]
    recurrent_activation = ACTIVATIONS[config["recurrent_activation"]]
    kernel = weights["kernel"].astype(np.float64)                      # (I, 4H)
    recurrent_kernel = weights["recurrent_kernel"].astype(np.float64)  # (H, 4H)
    bias = weights["bias"].astype(np.float64) if config["use_bias"] else np.zeros(4 * units)  # (4H,)
    i_, f_, c_, o_ = (slice(k * units, (k + 1) * units) for k in range(4))

    def step(x_t, carries):
        h, c = carries
        i = recurrent_activation(x_t @ kernel[:, i_] + h @ recurrent_kernel[:, i_] + bias[i_])
        f = recurrent_activation(x_t @ kernel[:, f_] + h @ recurrent_kernel[:, f_] + bias[f_])
        g = activation(x_t @ kernel[:, c_] + h @ recurrent_kernel[:, c_] + bias[c_])
        o = recurrent_activation(x_t @ kernel[:, o_] + h @ recurrent_kernel[:, o_] + bias[o_])
        new_c = f * c + i * g
        new_h = o * activation(new_c)
        return new_h, [new_h, new_c]
    return step


def _simple_rnn_cell(config, weights):
    """The SimpleRNN step: (x_t (B, I), [h (B, H)]) -> (output, [h'])."""
    activation = ACTIVATIONS[config["activation"]]
    kernel = weights["kernel"].astype(np.float64)                      # (I, H)
    recurrent_kernel = weights["recurrent_kernel"].astype(np.float64)  # (H, H)
    bias = weights["bias"].astype(np.float64) if config["use_bias"] else 0.0  # (H,)

    def step(x_t, carries):
        new_h = activation(x_t @ kernel + carries[0] @ recurrent_kernel + bias)
        return new_h, [new_h]
    return step


CELLS = {"gru": (_gru_cell, 1), "lstm": (_lstm_cell, 2), "simple_rnn": (_simple_rnn_cell, 1)}


def recurrent_direction(kind, config, weights, x, mask, initial):
    """One recurrent layer over x (B, T, I); returns (outputs (B, T, H) in processing order, last
    output, final carries). mask: (B, T) bool or None; initial: the initial carries, (B, H) each."""
    step = CELLS[kind][0](config, weights)
    carries = [np.array(carry, np.float64) for carry in initial]
    previous_output = np.zeros_like(carries[0])  # (B, H)
    outputs = []
    steps = range(x.shape[1] - 1, -1, -1) if config["go_backwards"] else range(x.shape[1])
    for t in steps:
        new_output, new_carries = step(x[:, t], carries)
        if mask is None:
            output, carries = new_output, new_carries
        else:
            keep = mask[:, t][:, None]  # (B, 1)
            skipped = np.zeros_like(new_output) if config["zero_output_for_mask"] else previous_output
            output = np.where(keep, new_output, skipped)
            carries = [np.where(keep, new, old) for new, old in zip(new_carries, carries)]
        outputs.append(output)
        previous_output = output
    return np.stack(outputs, axis=1), outputs[-1], carries


def _merge(mode, forward, backward):
    if mode == "concat":
        return np.concatenate([forward, backward], axis=-1)
    if mode == "sum":
        return forward + backward
    if mode == "mul":
        return forward * backward
    if mode == "ave":
        return (forward + backward) / 2.0
    raise ValueError(f"unknown merge mode {mode!r}")


def _padded(x, size, strides, padding, fill):
    """x (B, T, C) padded on the time axis as Keras pads a window of ``size`` steps."""
    steps = x.shape[1]
    if padding == "valid":
        return x
    if padding == "causal":
        left, right = size - 1, 0
    else:  # same: TensorFlow's split, the smaller half on the left
        out = -(-steps // strides)
        total = max((out - 1) * strides + size - steps, 0)
        left, right = total // 2, total - total // 2
    return np.pad(x, ((0, 0), (left, right), (0, 0)), constant_values=fill)


def conv1d(config, weights, x):
    """Keras Conv1D on x (B, T, I): every output row an explicit sum over taps, per group."""
    kernel = weights["kernel"].astype(np.float64)  # (K, I/G, F)
    taps, group_in, filters = kernel.shape
    groups, dilation, strides = config["groups"], config["dilation_rate"], config["strides"]
    size = (taps - 1) * dilation + 1
    x = _padded(x, size, strides, config["padding"], 0.0)
    rows = (x.shape[1] - size) // strides + 1
    group_out = filters // groups
    y = np.zeros((x.shape[0], rows, filters))
    for t in range(rows):
        for g in range(groups):
            for k in range(taps):
                inputs = x[:, t * strides + k * dilation, g * group_in:(g + 1) * group_in]  # (B, I/G)
                y[:, t, g * group_out:(g + 1) * group_out] += \
                    inputs @ kernel[k, :, g * group_out:(g + 1) * group_out]
    if config["use_bias"]:
        y = y + weights["bias"].astype(np.float64)
    return ACTIVATIONS[config["activation"]](y)


def pool1d(config, x, is_max):
    """Keras MaxPooling1D / AveragePooling1D on x (B, T, C); padded steps never count."""
    size, strides = config["pool_size"], config["strides"]
    x = _padded(x, size, strides, config["padding"], np.nan)
    rows = (x.shape[1] - size) // strides + 1
    windows = np.stack([x[:, t * strides:t * strides + size] for t in range(rows)], axis=1)  # (B, R, size, C)
    return np.nanmax(windows, axis=2) if is_max else np.nanmean(windows, axis=2)


def batch_normalization(config, weights, x):
    """Keras BatchNormalization at inference, axis -1."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    y = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + config["epsilon"])
    if config["scale"]:
        y = y * w["gamma"]
    return y + w["beta"] if config["center"] else y


def apply_transforms(steps, x):
    """The documented input steps; returns x and what each step needs to invert the output."""
    context = []
    for step in steps:
        if step["kind"] == "affine":
            x = x * np.asarray(step["scale"]) + np.asarray(step["offset"])
            context.append(None)
        elif step["kind"] == "log":
            x = np.log(x)
            context.append(None)
        else:
            mean = x.mean(axis=1)  # (B, F)
            x = x - mean[:, None, :]
            context.append(mean)
    return x, context


def invert_transforms(steps, y, context):
    for step, saved in reversed(list(zip(steps, context))):
        if step["kind"] == "affine":
            if step["output_scale"] is not None:
                y = (y - np.asarray(step["output_offset"])) / np.asarray(step["output_scale"])
        elif step["invert_output"] and step["kind"] == "log":
            y = np.exp(y)
        elif step["invert_output"]:
            mean = saved[:, step["output_features"]]  # (B, D)
            y = y + (mean[:, None, :] if y.ndim == 3 else mean)
    return y


def reference_run(spec: ModelSpec, x, initial_state=None, transforms: bool = True, lengths=None):
    """Run ``spec`` on x (B, T, F); returns (Keras's outputs list, every final carry).

    initial_state: None or one (B, units) array per carry in layer order (forward before backward;
    LSTM: h then c), as ``Model.predict`` takes it. The final carries come in the same order.
    lengths: None or (B,) valid steps per sample: a mask of trailing padding, as ``Model.predict`` takes it
    (it holds through causal Conv1D layers of strides 1, the only time-axis layers it is given with).
    """
    values = np.asarray(x, np.float64)  # (B, T, F)
    context = []
    if transforms:
        values, context = apply_transforms(spec.transforms, values)
    batch = values.shape[0]
    pending = list(initial_state) if initial_state is not None else None
    carries = []

    def start(kind, units):
        count = CELLS[kind][1]
        if pending is None:
            return [np.zeros((batch, units))] * count
        return [np.asarray(pending.pop(0), np.float64) for _ in range(count)]

    padding = None if lengths is None else np.arange(values.shape[1])[None, :] < np.asarray(lengths)[:, None]
    mask = padding  # (B, T) or None
    outputs = None
    for layer in spec.layers:
        config = layer.config
        if layer.kind == "masking":
            # Keras compares in the input's dtype, float32.
            mask = np.any(values.astype(np.float32) != np.float32(config["mask_value"]), axis=-1)  # (B, T)
            values = values * mask[..., None]
            mask = mask if padding is None else mask & padding
        elif layer.kind == "conv1d":
            values, mask = conv1d(config, layer.weights, values), padding  # Keras's Conv1D drops the mask
        elif layer.kind in ("max_pooling1d", "average_pooling1d"):
            values, mask = pool1d(config, values, layer.kind == "max_pooling1d"), None
        elif layer.kind == "global_max_pooling1d":
            values, mask = values.max(axis=1), None  # Keras ignores the mask here
        elif layer.kind == "global_average_pooling1d":
            keep = np.ones(values.shape[:2]) if mask is None else mask.astype(np.float64)  # (B, T)
            with np.errstate(invalid="ignore"):  # every step masked: 0 / 0, NaN as in Keras
                values = (values * keep[..., None]).sum(axis=1) / keep.sum(axis=1)[:, None]
            mask = None
        elif layer.kind == "batch_normalization":
            values = batch_normalization(config, layer.weights, values)
        elif layer.kind == "dense":
            values = values @ layer.weights["kernel"].astype(np.float64)
            if config["use_bias"]:
                values = values + layer.weights["bias"].astype(np.float64)
            values = ACTIVATIONS[config["activation"]](values)
        elif layer.kind in CELLS:
            sequence, last, final = recurrent_direction(layer.kind, config, layer.weights, values, mask,
                                                        start(layer.kind, config["units"]))
            carries += final
            values = sequence if config["return_sequences"] else last
            outputs = [values] + final if config["return_state"] else [values]
            mask = mask if config["return_sequences"] else None
        else:
            kind = config.get("layer", "gru")
            forward_config, backward_config = config["forward"], config["backward"]
            directions = []
            for name, direction in (("forward", forward_config), ("backward", backward_config)):
                weights = {key[len(name) + 1:]: value for key, value in layer.weights.items()
                           if key.startswith(name + ".")}
                directions.append(recurrent_direction(kind, direction, weights, values, mask,
                                                      start(kind, direction["units"])))
            (forward_sequence, forward_last, forward_carries), (backward_sequence, backward_last,
                                                                backward_carries) = directions
            carries += forward_carries + backward_carries
            if forward_config["return_sequences"]:
                # The backward layer ran over reversed time; put its outputs back in time order.
                forward_out, backward_out = forward_sequence, backward_sequence[:, ::-1]
            else:
                forward_out, backward_out = forward_last, backward_last
                mask = None
            states = forward_carries + backward_carries if forward_config["return_state"] else []
            if config["merge_mode"] is None:
                outputs = [forward_out, backward_out] + states
                values = None  # the last layer, by validation
            else:
                values = _merge(config["merge_mode"], forward_out, backward_out)
                outputs = [values] + states
        if layer.kind not in CELLS and layer.kind != "bidirectional":
            outputs = [values]
    if transforms and spec.transforms:
        outputs[0] = invert_transforms(spec.transforms, outputs[0], context)
    return outputs, carries


def reference_predict(spec: ModelSpec, x, initial_state=None, transforms: bool = True,
                      lengths=None) -> list[np.ndarray]:
    """What Keras's model(x) returns for the model ``spec`` describes, as a list of float64 arrays."""
    return reference_run(spec, x, initial_state, transforms, lengths)[0]


def rounding_sensitivity(spec: ModelSpec, x, seed: int = 0) -> float:
    """How far float32 rounding alone can move the outputs, in units of the parity tolerance.

    Every weight is nudged by a random relative 2**-24 (half a float32 ulp) and the float64 reference
    re-run (the input is left alone: nudging it could flip which steps a Masking layer masks);
    returns max |moved - exact| / (PARITY_ATOL + PARITY_RTOL |exact|). Well above
    0.1, the model amplifies rounding so much on x (long sequences through an expanding recurrence)
    that two correct float32 implementations cannot be expected to agree within the tolerance.
    """
    rng = np.random.default_rng(seed)

    def nudge(array):
        array = np.asarray(array, np.float64)
        return array * (1.0 + rng.choice([-1.0, 1.0], array.shape) * 2.0 ** -24)

    nudged_layers = [dataclasses.replace(layer, weights={name: nudge(w) for name, w in layer.weights.items()})
                     for layer in spec.layers]
    nudged = dataclasses.replace(spec, layers=nudged_layers)
    exact = reference_predict(spec, x, transforms=False)
    moved = reference_predict(nudged, x, transforms=False)
    return max(float(np.max(np.abs(m - e) / (PARITY_ATOL + PARITY_RTOL * np.abs(e)))) for m, e in zip(moved, exact))


def gru_config(units: int, **options) -> dict:
    """A complete spec GRU configuration: Keras's defaults, then ``options``."""
    config = {"units": units, "activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True,
              "reset_after": True, "return_sequences": False, "return_state": False, "go_backwards": False,
              "zero_output_for_mask": False, "stateful": False}
    config.update(options)
    return config


def recurrent_config(kind: str, units: int, **options) -> dict:
    """A complete spec configuration for a GRU, LSTM or SimpleRNN: Keras's defaults, then ``options``."""
    return {key: value for key, value in gru_config(units, **options).items()
            if key in RECURRENT_FAMILIES[kind].config_keys}


def random_spec(layers: list[Layer], input_features: int, seed: int = 0, check_shape=(2, 5),
                transforms=()) -> ModelSpec:
    """A spec of ``layers`` (weights ignored) with random float32 weights and a self-check from this
    reference, so bundle and runtime tests need no TensorFlow."""
    rng = np.random.default_rng(seed)
    spec = ModelSpec(input_features, [Layer(layer.kind, layer.name, layer.config) for layer in layers],
                     {"framework": "reference", "version": "1"}, list(transforms))
    for layer, shape in zip(spec.layers, trace_shapes(spec)):
        layer.weights = {name: rng.normal(0.0, 0.4, dims).astype(np.float32)
                         for name, dims in weight_shapes(layer, shape.input_dim).items()}
        if "moving_variance" in layer.weights:  # a variance is positive
            layer.weights["moving_variance"] = np.abs(layer.weights["moving_variance"]) + np.float32(0.5)
    x = rng.standard_normal((*check_shape, input_features)).astype(np.float32)  # (B, T, F)
    if any(step["kind"] == "log" for step in spec.transforms):
        x = np.abs(x) + np.float32(0.5)
    spec.self_check_input = x
    spec.self_check_outputs = [output.astype(np.float32) for output in reference_predict(spec, x, transforms=False)]
    return spec


def onnx_gru(x, w, r, b=None, sequence_lens=None, initial_h=None, direction="forward", linear_before_reset=0,
             layout=0, activations=None, activation_alpha=(), activation_beta=(), clip=None):
    """The ONNX GRU operator written out from its definition, in float64: returns (Y, Y_h).

    x (T, B, I) (layout 1: (B, T, I)), w (D, 3H, I), r (D, 3H, H), b (D, 6H), sequence_lens (B,),
    initial_h (D, B, H) (layout 1: (B, D, H)); Y (T, D, B, H), Y_h (D, B, H) (layout 1: batch first).
    A sample's Y is zero past its length; Y_h is its state at its last valid step; a reverse
    direction reads each sample backwards from its own last valid step.
    """
    x = np.asarray(x, np.float64)
    if layout:
        x = x.swapaxes(0, 1)
        initial_h = None if initial_h is None else np.asarray(initial_h).swapaxes(0, 1)
    steps, batch, _ = x.shape
    count, units = r.shape[0], r.shape[2]
    lengths = np.full(batch, steps) if sequence_lens is None else np.asarray(sequence_lens)
    names = list(activations or ["Sigmoid", "Tanh"] * count)
    alphas, betas = list(activation_alpha), list(activation_beta)
    onnx_names = {"hardsigmoid": "hard_sigmoid", "leakyrelu": "leaky_relu", "thresholdedrelu": "thresholded_relu",
                  "scaledtanh": "scaled_tanh"}
    # Defaults when activation_alpha/_beta run out: the operators' own, else 0 (as onnxruntime does).
    defaults = {"hard_sigmoid": (0.2, 0.5), "affine": (0.0, 0.0), "leaky_relu": (0.01, None),
                "thresholded_relu": (0.0, None), "scaled_tanh": (0.0, 0.0), "elu": (1.0, None)}
    functions = []
    for name in names:
        name = onnx_names.get(name.lower(), name.lower())
        alpha, beta = defaults.get(name, (None, None))
        alpha = None if alpha is None else (alphas.pop(0) if alphas else alpha)
        beta = None if beta is None else (betas.pop(0) if betas else beta)
        base = (lambda f, a, bb: lambda v: f(v, a, bb))(PARAMETRIC[name], alpha, beta) if name in PARAMETRIC \
            else ACTIVATIONS[name]
        functions.append(base if clip is None else (lambda f: lambda v: f(np.clip(v, -clip, clip)))(base))
    y = np.zeros((steps, count, batch, units))
    y_h = np.zeros((count, batch, units))
    for d in range(count):
        f, g = functions[2 * d:2 * d + 2]
        w_z, w_r, w_h = np.split(np.asarray(w[d], np.float64), 3)
        r_z, r_r, r_h = np.split(np.asarray(r[d], np.float64), 3)
        bias = np.zeros(6 * units) if b is None else np.asarray(b[d], np.float64)
        wb_z, wb_r, wb_h, rb_z, rb_r, rb_h = np.split(bias, 6)
        reverse = direction == "reverse" or d == 1
        for s in range(batch):
            h = np.zeros(units) if initial_h is None else np.asarray(initial_h[d, s], np.float64)
            order = range(lengths[s] - 1, -1, -1) if reverse else range(lengths[s])
            for t in order:
                x_t = x[t, s]
                z = f(x_t @ w_z.T + h @ r_z.T + wb_z + rb_z)
                r_t = f(x_t @ w_r.T + h @ r_r.T + wb_r + rb_r)
                if linear_before_reset:
                    hh = g(x_t @ w_h.T + r_t * (h @ r_h.T + rb_h) + wb_h)
                else:
                    hh = g(x_t @ w_h.T + (r_t * h) @ r_h.T + rb_h + wb_h)
                h = (1.0 - z) * hh + z * h
                y[t, d, s] = h
            y_h[d, s] = h
    if layout:
        return y.transpose(2, 0, 1, 3), y_h.swapaxes(0, 1)
    return y, y_h
