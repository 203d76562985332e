"""The in-memory model description every reader produces and every writer consumes.

A ``ModelSpec`` is a chain of layers, each a kind, a JSON-serialisable configuration using Keras's
names, and float32 weights in Keras's layout:

- ``masking``:       config ``mask_value``; no weights.
- ``gru``:           config ``units, activation, recurrent_activation, use_bias, reset_after,
                     return_sequences, return_state, go_backwards, zero_output_for_mask, stateful``;
                     weights ``kernel (input_dim, 3*units)``, ``recurrent_kernel (units, 3*units)``,
                     ``bias (2, 3*units)`` when reset_after else ``(3*units,)``, only when use_bias.
                     Gate columns are z | r | h. Graphs from ONNX may also use the rest of ONNX's
                     RNN activations (``ONNX_ACTIVATIONS``), and optional fields
                     ``[recurrent_]activation_alpha/_beta`` (for the functions that take them,
                     default ``ACTIVATION_PARAMETERS``) and ``clip`` (ONNX's cell clip).
- ``lstm``:          config as GRU's without ``reset_after``; weights ``kernel (input_dim, 4*units)``,
                     ``recurrent_kernel (units, 4*units)``, ``bias (4*units,)`` when use_bias. Gate
                     columns are i | f | c | o. Two carries per direction: h, then c.
- ``simple_rnn``:    config as LSTM's without ``recurrent_activation``; weights ``kernel (input_dim,
                     units)``, ``recurrent_kernel (units, units)``, ``bias (units,)`` when use_bias.
- ``bidirectional``: config ``merge_mode`` and ``forward``/``backward`` (two configs of the wrapped
                     layer, the backward one with go_backwards=True), and ``layer``, the wrapped kind,
                     when it is not ``gru`` (bundles written before LSTM have no ``layer``); weights
                     ``forward.<name>`` and ``backward.<name>``.
- ``dense``:         config ``units, activation, use_bias``; weights ``kernel (input_dim, units)``,
                     ``bias (units,)`` when use_bias. Applied per time step to sequences.
- ``conv1d``, ``max_pooling1d``, ``average_pooling1d``, ``global_average_pooling1d``,
  ``global_max_pooling1d``, ``batch_normalization``: the front-end kinds, see ``gru_engine.frontends``.
  Convolution and pooling change the number of time steps (``frontends.output_steps``).

``validate`` checks all of it once, so the runtime and the writers can trust a spec they are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import frontends, transforms
from .errors import is_float32_number
from .interface import validate_interface
from .layer_checks import LayerShape, check_keys, check_units, fail

FORMAT_NAME = "gru-engine-bundle"
# Version 2 bundles carry an ONNX graph's interface (``gru_engine.interface``); others stay version 1.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

RECURRENT_ACTIVATIONS = ("tanh", "sigmoid", "hard_sigmoid", "relu", "linear")
# The rest of ONNX's RNN activation family (Keras's names where Keras has the function).
ONNX_ACTIVATIONS = ("affine", "leaky_relu", "thresholded_relu", "scaled_tanh", "elu", "softsign", "softplus")
# (alpha, beta) each activation takes, as meant when a config leaves them out (None: not taken).
ACTIVATION_PARAMETERS = {"hard_sigmoid": (1.0 / 6.0, 0.5), "affine": (1.0, 0.0), "leaky_relu": (0.2, None),
                         "thresholded_relu": (1.0, None), "scaled_tanh": (1.0, 1.0), "elu": (1.0, None)}
GRU_PARAMETER_KEYS = ("recurrent_activation_alpha", "recurrent_activation_beta", "activation_alpha",
                      "activation_beta", "clip")
DENSE_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")
MERGE_MODES = ("concat", "sum", "mul", "ave", None)
LAYER_KINDS = ("masking", "gru", "lstm", "simple_rnn", "bidirectional", "dense")

# Bounds checked before anything is allocated, so a hostile manifest cannot ask for terabytes
# (units: layer_checks.MAX_UNITS).
MAX_FEATURES = 65536
MAX_LAYERS = 256
MAX_PARAMETERS = 500_000_000

GRU_CONFIG_KEYS = {
    "units": int,
    "activation": str,
    "recurrent_activation": str,
    "use_bias": bool,
    "reset_after": bool,
    "return_sequences": bool,
    "return_state": bool,
    "go_backwards": bool,
    "zero_output_for_mask": bool,
    "stateful": bool,
}
DENSE_CONFIG_KEYS = {"units": int, "activation": str, "use_bias": bool}


@dataclasses.dataclass(frozen=True)
class RecurrentFamily:
    """What a recurrent layer kind implies: its Keras class, configuration keys, gate blocks in the
    kernel columns and carries per direction."""

    keras_class: str
    config_keys: dict[str, type]
    gates: int
    carries: int


RECURRENT_FAMILIES = {
    "gru": RecurrentFamily("GRU", GRU_CONFIG_KEYS, 3, 1),
    "lstm": RecurrentFamily("LSTM", {k: v for k, v in GRU_CONFIG_KEYS.items() if k != "reset_after"}, 4, 2),
    "simple_rnn": RecurrentFamily("SimpleRNN", {k: v for k, v in GRU_CONFIG_KEYS.items()
                                                if k not in ("reset_after", "recurrent_activation")}, 1, 1),
}


@dataclasses.dataclass
class Layer:
    kind: str
    name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelSpec:
    input_features: int
    layers: list[Layer]
    source: dict[str, str] = dataclasses.field(default_factory=dict)
    # Declarative pre/post-processing steps, see ``gru_engine.transforms``.
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # A small input (batch, time, features) and the source framework's outputs for it.
    self_check_input: np.ndarray | None = None
    self_check_outputs: list[np.ndarray] = dataclasses.field(default_factory=list)
    # An imported ONNX graph's inputs and outputs, for ``gru_engine.InferenceSession``.
    interface: dict[str, Any] | None = None

    def shapes(self) -> list[LayerShape]:
        return trace_shapes(self)

    @property
    def output_count(self) -> int:
        """How many arrays ``predict`` returns: the output (two for merge_mode=None), then with
        return_state every carry of the last layer (Keras: [h] or [h, c] per direction)."""
        last = self.layers[-1]
        configs = recurrent_configs(last)
        unmerged = last.kind == "bidirectional" and last.config["merge_mode"] is None
        states = len(configs) * RECURRENT_FAMILIES[recurrent_kind(last)].carries \
            if configs and configs[0]["return_state"] else 0
        return 1 + unmerged + states

    @property
    def parameter_count(self) -> int:
        return sum(shape.parameters for shape in self.shapes())


def sample_input(spec: ModelSpec, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal (batch, time, features) float32 for checks; with Masking, sample 0 gets a padded
    step in the middle and the last sample a padded second half, so masking is exercised too."""
    x = rng.standard_normal((batch, steps, spec.input_features)).astype(np.float32)  # (B, T, F)
    for layer in spec.layers:
        if layer.kind == "masking" and steps > 2:
            x[0, steps // 2, :] = layer.config["mask_value"]
            x[-1, steps // 2:, :] = layer.config["mask_value"]
    return x


def recurrent_kind(layer: Layer) -> str | None:
    """The recurrent family a layer runs (a Bidirectional's wrapped one), or None."""
    if layer.kind == "bidirectional":
        return layer.config.get("layer", "gru")
    return layer.kind if layer.kind in RECURRENT_FAMILIES else None


def recurrent_configs(layer: Layer) -> list[dict[str, Any]]:
    """A layer's recurrent configurations: one for GRU/LSTM/SimpleRNN, forward then backward for a
    Bidirectional, none for other kinds."""
    if layer.kind in RECURRENT_FAMILIES:
        return [layer.config]
    if layer.kind == "bidirectional":
        return [layer.config["forward"], layer.config["backward"]]
    return []


def stream_blockers(spec: ModelSpec) -> list[tuple[str, str]]:
    """(name, why) of every layer that cannot run one step at a time: its output at time t depends
    on later inputs, or it does not emit one output per input step. ``why`` follows the name."""
    blockers = []
    for layer in spec.layers:
        if layer.kind == "bidirectional" or (layer.kind in RECURRENT_FAMILIES and layer.config["go_backwards"]):
            blockers.append((layer.name, "reads the sequence backwards, so its output at time t depends "
                                         "on later inputs"))
        elif layer.kind in frontends.KINDS and frontends.not_streamable(layer):
            blockers.append((layer.name, frontends.not_streamable(layer)))
    return blockers


def backward_layers(spec: ModelSpec) -> list[str]:
    """Names of the layers that cannot stream (see ``stream_blockers``)."""
    return [name for name, _ in stream_blockers(spec)]


def recurrent_weight_shapes(kind: str, config: dict[str, Any], input_dim: int) -> dict[str, tuple[int, ...]]:
    units = config["units"]
    columns = RECURRENT_FAMILIES[kind].gates * units
    shapes = {"kernel": (input_dim, columns), "recurrent_kernel": (units, columns)}
    if config["use_bias"]:
        # Keras's GRU with reset_after keeps a second bias row, on the recurrent side.
        shapes["bias"] = (2, columns) if config.get("reset_after") else (columns,)
    return shapes


def weight_shapes(layer: Layer, input_dim: int) -> dict[str, tuple[int, ...]]:
    """The exact set of tensors a layer's configuration implies."""
    if layer.kind in frontends.KINDS:
        return frontends.weight_shapes(layer, input_dim)
    if layer.kind in RECURRENT_FAMILIES:
        return recurrent_weight_shapes(layer.kind, layer.config, input_dim)
    if layer.kind == "bidirectional":
        shapes = {}
        for direction in ("forward", "backward"):
            for name, shape in recurrent_weight_shapes(recurrent_kind(layer), layer.config[direction],
                                                       input_dim).items():
                shapes[f"{direction}.{name}"] = shape
        return shapes
    if layer.kind == "dense":
        shapes = {"kernel": (input_dim, layer.config["units"])}
        if layer.config["use_bias"]:
            shapes["bias"] = (layer.config["units"],)
        return shapes
    return {}


def _check_recurrent_config(index: int, kind: str, config: Any, what: str) -> None:
    onnx = kind == "gru"  # ONNX's activation parameters and clip reach the GRU kernel only
    check_keys(index, config, RECURRENT_FAMILIES[kind].config_keys, what, GRU_PARAMETER_KEYS if onnx else ())
    check_units(index, config["units"], "units")
    supported = RECURRENT_ACTIVATIONS + ONNX_ACTIVATIONS if onnx else RECURRENT_ACTIVATIONS
    for field in ("activation", "recurrent_activation"):
        if field not in config:
            continue
        if config[field] not in supported:
            fail(index, f"{what} '{field}' is {config[field]!r}; supported: {list(supported)}")
        taken = ACTIVATION_PARAMETERS.get(config[field], (None, None))
        for name, default in zip(("alpha", "beta"), taken):
            value = config.get(f"{field}_{name}")
            if value is None:
                continue
            if default is None:
                fail(index, f"{what} has '{field}_{name}', but {config[field]} takes no {name}")
            if not is_float32_number(value):
                fail(index, f"{what} '{field}_{name}' is {value!r:.40}; it must be a number finite in float32")
    clip = config.get("clip")
    if clip is not None and not (is_float32_number(clip) and clip > 0):
        fail(index, f"{what} 'clip' is {clip!r:.40}; it must be a positive number")


def activation_parameters(config: dict[str, Any]) -> list[float] | None:
    """[recurrent alpha, recurrent beta, alpha, beta, clip (0: none)] for the GRU kernel, or None when
    the direction needs none (the activations of Keras, at Keras's parameters, unclipped)."""
    names = (config["recurrent_activation"], config["activation"])
    if not any(name in ONNX_ACTIVATIONS for name in names) and not any(key in config for key in GRU_PARAMETER_KEYS):
        return None
    values = []
    for field in ("recurrent_activation", "activation"):
        alpha, beta = ACTIVATION_PARAMETERS.get(config[field], (None, None))
        values += [config.get(f"{field}_alpha", alpha or 0.0), config.get(f"{field}_beta", beta or 0.0)]
    return [float(v) for v in values] + [float(config.get("clip", 0.0))]
def _refuse_unknown_kind(index: int, kind: Any, known) -> None:
    """A kind this version does not know comes from a newer gru-engine (or a damaged file): never guess."""
    fail(index, f"unknown layer kind {kind!r:.80}; this gru-engine knows {list(known)}. If a newer "
                "gru-engine wrote the model, upgrade gru-engine (pip install --upgrade gru-engine) to read it")


def _trace_layer(index: int, layer: Layer, input_dim: int, is_sequence: bool) -> LayerShape:
    if layer.kind in frontends.KINDS:
        return frontends.trace(index, layer, input_dim, is_sequence)
    if layer.kind not in LAYER_KINDS:
        _refuse_unknown_kind(index, layer.kind, LAYER_KINDS + frontends.KINDS)
    config = layer.config
    if layer.kind == "masking":
        if not isinstance(config, dict) or set(config) != {"mask_value"}:
            fail(index, "masking config must be exactly {'mask_value': number}")
        value = config["mask_value"]
        if not is_float32_number(value):
            fail(index, f"masking 'mask_value' must be a number finite in float32, got {value!r:.80}")
        if not is_sequence:
            fail(index, "masking needs a sequence input; it cannot follow a recurrent layer with "
                        "return_sequences=False")
        return LayerShape(input_dim, input_dim, True, True, (), 0)
    if layer.kind == "dense":
        check_keys(index, config, DENSE_CONFIG_KEYS, "dense")
        check_units(index, config["units"], "units")
        if config["activation"] not in DENSE_ACTIVATIONS:
            fail(index, f"dense 'activation' is {config['activation']!r}; supported: {list(DENSE_ACTIVATIONS)}")
        units = config["units"]
        parameters = input_dim * units + (units if config["use_bias"] else 0)
        return LayerShape(input_dim, units, is_sequence, is_sequence, (), parameters)
    if not is_sequence:
        fail(index, f"{layer.kind} needs a sequence input; set return_sequences=True on the layer before it")
    if layer.kind in RECURRENT_FAMILIES:
        _check_recurrent_config(index, layer.kind, config, layer.kind)
        directions = [config]
    else:
        if not isinstance(config, dict) or not {"merge_mode", "forward", "backward"} <= set(config) \
                or not set(config) <= {"merge_mode", "forward", "backward", "layer"}:
            fail(index, "bidirectional config must have exactly the fields merge_mode, forward, backward "
                        "(and layer, the wrapped kind, unless it is gru)")
        wrapped = config.get("layer", "gru")
        if not isinstance(wrapped, str) or wrapped not in RECURRENT_FAMILIES:
            _refuse_unknown_kind(index, wrapped, RECURRENT_FAMILIES)
        if config["merge_mode"] not in MERGE_MODES:
            fail(index, f"bidirectional 'merge_mode' is {config['merge_mode']!r}; supported: {list(MERGE_MODES)}")
        _check_recurrent_config(index, wrapped, config["forward"], f"bidirectional {wrapped} forward")
        _check_recurrent_config(index, wrapped, config["backward"], f"bidirectional {wrapped} backward")
        forward, backward = config["forward"], config["backward"]
        if forward["go_backwards"] or not backward["go_backwards"]:
            fail(index, "bidirectional needs forward go_backwards=False and backward go_backwards=True")
        for field in ("return_sequences", "return_state", "stateful"):
            if forward[field] != backward[field]:
                fail(index, f"bidirectional forward and backward disagree on '{field}'")
        if config["merge_mode"] in ("sum", "mul", "ave") and forward["units"] != backward["units"]:
            fail(index, f"merge_mode {config['merge_mode']!r} needs equal units in both directions")
        directions = [forward, backward]
    units = [direction["units"] for direction in directions]
    if layer.kind == "bidirectional" and layer.config["merge_mode"] in ("concat", None):
        output_dim = sum(units)  # merge_mode=None: both directions side by side, split on return
    else:
        output_dim = units[0]
    parameters = sum(
        int(np.prod(shape)) for shape in weight_shapes(layer, input_dim).values()
    )
    carries = RECURRENT_FAMILIES[recurrent_kind(layer)].carries
    state_dims = tuple(n for n in units for _ in range(carries))
    return LayerShape(input_dim, output_dim, True, directions[0]["return_sequences"], state_dims, parameters)


def trace_shapes(spec: ModelSpec) -> list[LayerShape]:
    """Walk the chain checking each configuration; return every layer's shapes."""
    if not isinstance(spec.input_features, int) or isinstance(spec.input_features, bool) \
            or not 1 <= spec.input_features <= MAX_FEATURES:
        fail(None, f"input_features is {spec.input_features!r}; it must be an int between 1 and {MAX_FEATURES}")
    if not isinstance(spec.layers, list) or not 1 <= len(spec.layers) <= MAX_LAYERS:
        fail(None, f"the model needs between 1 and {MAX_LAYERS} layers")
    shapes = []
    dim, is_sequence = spec.input_features, True
    for index, layer in enumerate(spec.layers):
        shape = _trace_layer(index, layer, dim, is_sequence)
        last = index == len(spec.layers) - 1
        if layer.kind == "bidirectional" and layer.config["merge_mode"] is None and not last:
            fail(index, "bidirectional merge_mode=None returns two tensors, so it must be the last layer")
        if any(config["return_state"] for config in recurrent_configs(layer)) and not last:
            fail(index, "return_state=True is only supported on the last layer of the chain")
        shapes.append(shape)
        dim, is_sequence = shape.output_dim, shape.output_is_sequence
    if not any(recurrent_kind(layer) for layer in spec.layers):
        fail(None, "the model has no recurrent layer (GRU, LSTM or SimpleRNN)")
    if sum(shape.parameters for shape in shapes) > MAX_PARAMETERS:
        fail(None, f"the model has more than {MAX_PARAMETERS} parameters")
    return shapes


def validate(spec: ModelSpec) -> list[LayerShape]:
    """Check configuration, weight names, shapes, dtypes and values; return the traced shapes."""
    shapes = trace_shapes(spec)
    names = set()
    for index, (layer, shape) in enumerate(zip(spec.layers, shapes)):
        if not isinstance(layer.name, str) or not layer.name or layer.name in names:
            fail(index, f"layer names must be unique non-empty strings, got {layer.name!r}")
        names.add(layer.name)
        expected = weight_shapes(layer, shape.input_dim)
        missing = sorted(set(expected) - set(layer.weights))
        extra = sorted(set(layer.weights) - set(expected))
        if missing or extra:
            fail(index, f"{layer.kind} '{layer.name}' is missing tensors {missing} and has unexpected "
                        f"tensors {extra}; its configuration implies exactly {sorted(expected)}")
        for name, want in expected.items():
            array = layer.weights[name]
            if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                fail(index, f"tensor '{name}' must be a float32 array, got "
                            f"{getattr(array, 'dtype', type(array).__name__)}")
            if array.shape != want:
                fail(index, f"tensor '{name}' has shape {array.shape}, the configuration implies {want}")
            if not np.isfinite(array).all():
                fail(index, f"tensor '{name}' contains NaN or infinite values")
        frontends.check_weights(index, layer)
    _validate_self_check(spec, shapes)
    if spec.interface is not None:
        validate_interface(spec, shapes, output_shapes(spec, shapes, 1, 2))
    # Transforms undo themselves on the main output: for merge_mode=None, one direction's width.
    main_output_width = output_shapes(spec, shapes, 1, 1)[0][-1]
    transforms.validate(spec.transforms, spec.input_features, main_output_width)
    return shapes


def output_shapes(spec: ModelSpec, shapes: list[LayerShape], batch: int, time: int) -> list[tuple[int, ...]]:
    """The shapes ``predict`` returns for an input of (batch, time, input_features)."""
    time = frontends.output_steps(spec, time)
    last = shapes[-1]
    main = (batch, time, last.output_dim) if last.output_is_sequence else (batch, last.output_dim)
    layer = spec.layers[-1]
    if layer.kind == "bidirectional" and layer.config["merge_mode"] is None:
        mains = [main[:-1] + (config["units"],) for config in recurrent_configs(layer)]
    else:
        mains = [main]
    states = [(batch, units) for units in last.state_dims] if spec.output_count > len(mains) else []
    return mains + states


def _validate_self_check(spec: ModelSpec, shapes: list[LayerShape]) -> None:
    x = spec.self_check_input
    if x is None:
        if spec.self_check_outputs:
            fail(None, "self-check outputs are present without a self-check input")
        return
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 3 \
            or x.shape[2] != spec.input_features or x.shape[0] < 1 or x.shape[1] < 1 or x.size > 1_000_000:
        fail(None, f"self-check input must be a small float32 array (batch, time, {spec.input_features}), "
                   f"got {getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
    if not np.isfinite(x).all():
        fail(None, "self-check input contains NaN or infinite values")
    short = frontends.too_short(spec, x.shape[1])
    if short:
        fail(None, f"self-check input: {short}")
    expected = output_shapes(spec, shapes, x.shape[0], x.shape[1])
    got = [getattr(y, "shape", None) for y in spec.self_check_outputs]
    if got != expected or any(y.dtype != np.float32 for y in spec.self_check_outputs):
        fail(None, f"self-check outputs must be float32 arrays of shapes {expected}, got {got}")
    if not all(np.isfinite(y).all() for y in spec.self_check_outputs):
        fail(None, "self-check outputs contain NaN or infinite values")


# Float32 parity with the source framework, used by the bundle self-check and every parity test.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4


def max_excess(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest |actual - expected| beyond the parity tolerance (<= 0 means within it; NaN is inf)."""
    excess = np.abs(actual - expected) - (PARITY_ATOL + PARITY_RTOL * np.abs(expected))
    return float(np.max(np.nan_to_num(excess, nan=np.inf), initial=-np.inf))
