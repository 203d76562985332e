"""ModelSpec -> ONNX graph of native ONNX GRU, LSTM and RNN operators (no Loop, no Scan), and ``export_onnx``.

Graph interface (``batch`` and ``time`` are dynamic):

    input               (batch, time, features) float32
    initial_state_<k>   (batch, units_k)   only with state_io=True; feeds a node's initial_h or initial_c,
                        or for a (batch, steps, channels) causal Conv1D, its last inputs of earlier calls
    output              (batch, time, D) or (batch, D): the model's main output
    output_forward,     instead of ``output`` when the last layer is Bidirectional(merge_mode=None)
    output_backward
    state_<k>           (batch, units_k)   final carry k

``k`` counts carries in layer order: h per GRU or SimpleRNN direction, h then c per LSTM direction
(a Bidirectional layer: forward's, then backward's), the order of ``gru_engine.Model.state_shapes``
and of Keras's initial_state. Without state_io the graph returns what Keras returns: the main
output(s), then ``state_<k>`` for the last layer's carries when it has return_state=True. With
state_io=True it returns the main output(s), then every ``state_<k>``, so a caller can carry the
state from one call to the next (streaming).

ONNX GRU (gates z, r, h, as in Keras), per direction, time-major X (time, batch, input):

    z_t = f(X_t W_z^T + H_{t-1} R_z^T + Wb_z + Rb_z)
    r_t = f(X_t W_r^T + H_{t-1} R_r^T + Wb_r + Rb_r)
    h_t = g(X_t W_h^T + r_t * (H_{t-1} R_h^T + Rb_h) + Wb_h)      linear_before_reset=1
    h_t = g(X_t W_h^T + (r_t * H_{t-1}) R_h^T + Rb_h + Wb_h)      linear_before_reset=0
    H_t = (1 - z_t) * h_t + z_t * H_{t-1}

so the Keras weights map as W = kernel.T (3H, I), R = recurrent_kernel.T (3H, H), B = [Wb, Rb]
(6H,), with f = recurrent_activation and g = activation:

    reset_after=True   linear_before_reset=1, Wb = bias[0], Rb = bias[1]
    reset_after=False  linear_before_reset=0, Wb = bias,    Rb = 0

ONNX LSTM (gates i, o, f, c; Keras stores i, f, c, o), per direction, with P (peepholes) absent:

    i_t = f(X_t W_i^T + H_{t-1} R_i^T + Wb_i + Rb_i)      o_t = f(X_t W_o^T + H_{t-1} R_o^T + Wb_o + Rb_o)
    f_t = f(X_t W_f^T + H_{t-1} R_f^T + Wb_f + Rb_f)      c_t = g(X_t W_c^T + H_{t-1} R_c^T + Wb_c + Rb_c)
    C_t = f_t * C_{t-1} + i_t * c_t                        H_t = o_t * h(C_t)

so W and R are Keras's kernel.T and recurrent_kernel.T with their gate blocks reordered to i, o, f, c,
Wb is Keras's bias (reordered the same way), Rb = 0, f = recurrent_activation, g = h = activation.
ONNX RNN: H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb), W = kernel.T, Wb = bias, Rb = 0, f = activation.

Keras go_backwards returns its sequence in processing order (reversed in time); an ONNX "reverse"
GRU writes Y in time order, so a go_backwards layer that returns sequences gets a time reversal.
Keras Bidirectional re-aligns the backward sequence in time, which is exactly ONNX's Y.

Refused (UnsupportedModelError), because one recurrent node cannot reproduce it exactly: Masking (Keras
skips masked steps anywhere in a sequence; ONNX sequence_lens only drops trailing steps). The
tf2onnx path (``tf2onnx_export``) does reproduce it, with a Loop. A stateful layer is written like
any other, starting each call from zero (as ``predict`` does); state_io=True carries the state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from gru_engine import frontends
from gru_engine.errors import UnsupportedModelError
from gru_engine.fileio import atomic_write_bytes
from gru_engine.spec import ACTIVATION_PARAMETERS, Layer, ModelSpec, recurrent_configs, recurrent_kind, validate

from . import onnx_conv
from .onnx_interface import (DEFAULT_OPSET, INPUT, MIN_OPSET, carried_state_dims, initial_state_name, main_names,
                             output_names, returned_states, state_name)


# Spec activation -> (ONNX activation, default alpha, default beta), None where the function takes none.
# Keras 3 hard_sigmoid is HardSigmoid(1/6, 0.5), linear Affine(1, 0); a GRU config may set the
# parameters (spec.ACTIVATION_PARAMETERS). Only GRU configs hold the names after "linear".
RECURRENT_ACTIVATIONS = {
    name: (onnx_name, *({"linear": (1.0, 0.0)}.get(name) or ACTIVATION_PARAMETERS.get(name, (None, None))))
    for name, onnx_name in (("sigmoid", "Sigmoid"), ("tanh", "Tanh"), ("relu", "Relu"),
                            ("hard_sigmoid", "HardSigmoid"), ("linear", "Affine"), ("affine", "Affine"),
                            ("leaky_relu", "LeakyRelu"), ("thresholded_relu", "ThresholdedRelu"),
                            ("scaled_tanh", "ScaledTanh"), ("elu", "Elu"), ("softsign", "Softsign"),
                            ("softplus", "Softplus"))
}
DENSE_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax"}  # else linear
# Keras's LSTM gate blocks i, f, c, o, in ONNX's order i, o, f, c.
LSTM_GATES_TO_ONNX = (0, 3, 1, 2)
MERGE_OPS = {"sum": "Add", "mul": "Mul", "ave": "Add"}


class _Graph:
    """Nodes and initializers with unique tensor names; ``reserved``: the graph's input and output names."""

    def __init__(self, reserved: list[str]):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes, self.initializers = [], []
        self._used = set(reserved)
        self._constants = set()  # helper constants (axes, indices) are stored once
        self._renamed = {}       # intermediate tensor -> the graph-output name it was given

    def fresh(self, hint: str) -> str:
        name, index = hint, 1
        while name in self._used:
            name, index = f"{hint}_{index}", index + 1
        self._used.add(name)
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        if name not in self._constants:
            self._constants.add(name)
            self._used.add(name)
            self.initializers.append(self._numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        """A shared int64 vector constant, e.g. the axes of a Squeeze."""
        return self.constant("ints_" + "_".join(str(v).replace("-", "m") for v in values),
                             np.array(values, np.int64))

    def index(self, value: int) -> str:
        return self.constant(f"index_{value}", np.array(value, np.int64))

    def add(self, op: str, inputs: list[str], hints: str | list[str | None], node: str | None = None,
            **attributes):
        """Append a node; one output name per hint (None: that optional output is not produced).

        ``node`` names the node (a layer's name for its main node, which an importer keeps).
        """
        single = isinstance(hints, str)
        names = [self.fresh(hint) if hint else "" for hint in ([hints] if single else hints)]
        while inputs and not inputs[-1]:
            inputs = inputs[:-1]  # trailing optional inputs are left out, not named ""
        node_name = self.fresh(node or f"{op}/{next(name for name in names if name)}")
        self.nodes.append(self._helper.make_node(op, inputs, names, name=node_name, **attributes))
        return names[0] if single else names

    def name_output(self, tensor: str, name: str) -> None:
        """Rename an intermediate tensor to a graph-output name (an Identity if it already has one)."""
        if tensor in self._renamed:
            self.nodes.append(self._helper.make_node("Identity", [self._renamed[tensor]], [name],
                                                     name=self.fresh(f"Identity/{name}")))
            return
        for node in self.nodes:
            node.input[:] = [name if value == tensor else value for value in node.input]
            node.output[:] = [name if value == tensor else value for value in node.output]
        self._renamed[tensor] = name


def _refuse_unexpressible(spec: ModelSpec) -> None:
    for layer in spec.layers:
        if layer.kind == "masking":
            raise UnsupportedModelError(
                f"layer '{layer.name}' (Masking): the native ONNX export cannot reproduce Keras masking exactly "
                "(Keras skips masked steps anywhere in a sequence; an ONNX node's sequence_lens only drops "
                "trailing steps). Export this model with method='tf2onnx', or remove the Masking layer")
        if layer.kind == "bidirectional" and layer.config["forward"].get("clip") != layer.config["backward"].get("clip"):
            raise UnsupportedModelError(f"layer '{layer.name}': its two directions clip differently, and one ONNX "
                                        "GRU node has one clip")


def _gru_bias(config: dict, bias) -> np.ndarray:
    """[Wb, Rb] (6H,) from a Keras GRU bias."""
    if config["reset_after"]:
        return np.concatenate([bias[0], bias[1]])
    return np.concatenate([bias, np.zeros_like(bias)])


def _lstm_gates(matrix: np.ndarray) -> np.ndarray:
    """Gate blocks (on the last axis) from Keras's i, f, c, o to ONNX's i, o, f, c."""
    blocks = np.split(matrix, 4, axis=-1)
    return np.concatenate([blocks[gate] for gate in LSTM_GATES_TO_ONNX], axis=-1)


@dataclasses.dataclass(frozen=True)
class _OnnxCell:
    """How one recurrent family is written: its operator, carries, the Keras activations behind the
    node's activation list, the gate reordering of the weights' columns and the bias mapping."""

    op: str
    carries: int
    activations: tuple[str, ...]
    columns: Callable[[np.ndarray], np.ndarray]
    bias: Callable[[dict, np.ndarray], np.ndarray]


ONNX_CELLS = {
    "gru": _OnnxCell("GRU", 1, ("recurrent_activation", "activation"), lambda m: m, _gru_bias),
    "lstm": _OnnxCell("LSTM", 2, ("recurrent_activation", "activation", "activation"), _lstm_gates,
                      lambda config, bias: np.concatenate([_lstm_gates(bias), np.zeros_like(bias)])),
    "simple_rnn": _OnnxCell("RNN", 1, ("activation",), lambda m: m,
                            lambda config, bias: np.concatenate([bias, np.zeros_like(bias)])),
}


def _activation_attributes(cell: _OnnxCell, configs: list[dict]) -> dict:
    """The node's activations, per direction; onnxruntime hands alpha/beta only to functions that take them."""
    names, alphas, betas = [], [], []
    for config in configs:
        for field in cell.activations:
            onnx_name, alpha, beta = RECURRENT_ACTIVATIONS[config[field]]
            names.append(onnx_name)
            if alpha is not None:
                alphas.append(float(config.get(f"{field}_alpha", alpha)))
            if beta is not None:
                betas.append(float(config.get(f"{field}_beta", beta)))
    attributes = {"activations": names}
    if alphas:
        attributes["activation_alpha"] = alphas
    if betas:
        attributes["activation_beta"] = betas
    if "clip" in configs[0]:
        attributes["clip"] = float(configs[0]["clip"])
    return attributes


def _recurrent_node(g: _Graph, kind: str, name: str, weights: dict, directions: list[tuple[str, dict]], x: str,
                    initial: list[str], need_sequence: bool, need_final: bool, need_carries: bool):
    """One ONNX GRU, LSTM or RNN over x (T, B, I) for one or two directions; per direction
    (sequence (T, B, H) or None, [final carries (B, H)]: h, then c for an LSTM, or [] when not needed).

    ``directions`` are (weight-name prefix, config) pairs; ``initial`` the initial_state_<k> inputs,
    if any, per direction h (then c).
    """
    cell = ONNX_CELLS[kind]
    configs = [config for _, config in directions]
    units = configs[0]["units"]
    w = np.stack([cell.columns(weights[prefix + "kernel"]).T for prefix, _ in directions])            # (D, GH, I)
    r = np.stack([cell.columns(weights[prefix + "recurrent_kernel"]).T for prefix, _ in directions])  # (D, GH, H)
    inputs = [x, g.constant(f"{name}.W", w), g.constant(f"{name}.R", r), ""]
    if any(config["use_bias"] for config in configs):
        b = np.stack([cell.bias(config, weights[prefix + "bias"]) if config["use_bias"]
                      else np.zeros(2 * w.shape[1], np.float32) for prefix, config in directions])  # (D, 2GH)
        inputs[3] = g.constant(f"{name}.B", b)
    if initial:
        inputs.append("")  # sequence_lens
        # Each initial_state_<k> is (B, H); the node wants initial_h (and initial_c) as (D, B, H).
        for carry in range(cell.carries):
            stacked = [g.add("Unsqueeze", [state, g.ints(0)], f"{state}.3d") for state in initial[carry::cell.carries]]
            inputs.append(stacked[0] if len(stacked) == 1 else g.add("Concat", stacked, f"{name}.initial", axis=0))
    if len(directions) == 2:
        direction = "bidirectional"
    else:
        direction = "reverse" if configs[0]["go_backwards"] else "forward"
    extra = {"linear_before_reset": int(configs[0]["reset_after"])} if kind == "gru" else {}
    wanted = [need_sequence, need_final or need_carries] + [need_carries] * (cell.carries - 1)
    hints = [f"{name}.{output}" if want else None for output, want in zip(("Y", "Y_h", "Y_c"), wanted)]
    produced = g.add(cell.op, inputs, hints, node=name, hidden_size=units, direction=direction,
                     **extra, **_activation_attributes(cell, configs))
    y, finals = produced[0], [final for final in produced[1:] if final]
    # Y is (T, D, B, H) and Y_h, Y_c (D, B, H): take direction d out of the D axis.
    if len(directions) == 1:
        return [(g.add("Squeeze", [y, g.ints(1)], f"{name}.sequence") if y else None,
                 [g.add("Squeeze", [final, g.ints(0)], f"{name}.final") for final in finals])]
    return [(g.add("Gather", [y, g.index(d)], f"{name}.sequence", axis=1) if y else None,
             [g.add("Gather", [final, g.index(d)], f"{name}.final", axis=0) for final in finals])
            for d in range(len(directions))]


def _reverse_time(g: _Graph, sequence: str) -> str:
    """x[::-1] along time (axis 0 of a time-major tensor), for any length."""
    return g.add("Slice", [sequence, g.ints(-1), g.ints(np.iinfo(np.int64).min), g.ints(0), g.ints(-1)],
                 "reversed")


def _recurrent(g: _Graph, layer: Layer, x: str, initial: list[str], need_carries: bool):
    """A GRU, LSTM, SimpleRNN or Bidirectional layer over x (T, B, I); per direction (output, [final
    carries] when ``need_carries``, else []).

    The output is the sequence (T, B, H) as Keras returns it, or the final h (B, H).
    """
    kind = recurrent_kind(layer)
    if layer.kind == "bidirectional":
        directions = [("forward.", layer.config["forward"]), ("backward.", layer.config["backward"])]
    else:
        directions = [("", layer.config)]
    configs = [config for _, config in directions]
    need_sequence = configs[0]["return_sequences"]
    # A bidirectional ONNX node shares hidden_size (and a GRU's linear_before_reset) across its directions.
    shared = len(directions) == 1 or (configs[0]["units"] == configs[1]["units"]
                                      and configs[0].get("reset_after") == configs[1].get("reset_after"))
    if shared:
        groups = [(layer.name, directions)]
    else:  # two nodes, forward and reverse, over the same input
        groups = [(f"{layer.name}.{prefix[:-1]}", [(prefix, config)]) for prefix, config in directions]
    carries = ONNX_CELLS[kind].carries
    results = []
    for name, group in groups:
        first = len(results) * carries
        group_initial = initial[first:first + len(group) * carries]
        results += _recurrent_node(g, kind, name, layer.weights, group, x, group_initial, need_sequence,
                                   not need_sequence, need_carries)
    outputs = []
    for (sequence, finals), config in zip(results, configs):
        if sequence is not None and layer.kind != "bidirectional" and config["go_backwards"]:
            sequence = _reverse_time(g, sequence)  # Keras returns processing order
        outputs.append((sequence if need_sequence else finals[0], finals if need_carries else []))
    return outputs


def _merge(g: _Graph, mode: str, forward: str, backward: str, hint: str) -> str:
    if mode == "concat":
        return g.add("Concat", [forward, backward], hint, axis=-1)
    merged = g.add(MERGE_OPS[mode], [forward, backward], hint)
    if mode == "ave":
        # (a + b) * 0.5 equals Keras's (a + b) / 2 exactly in float32.
        merged = g.add("Mul", [merged, g.constant("half", np.array(0.5, np.float32))], hint)
    return merged


def _dense(g: _Graph, layer: Layer, x: str) -> str:
    """x (..., I) @ kernel (I, U) + bias (U,), then the activation; per time step on sequences."""
    y = g.add("MatMul", [x, g.constant(f"{layer.name}.kernel", layer.weights["kernel"])], f"{layer.name}.matmul",
              node=layer.name)
    if layer.config["use_bias"]:
        y = g.add("Add", [y, g.constant(f"{layer.name}.bias", layer.weights["bias"])], f"{layer.name}.add")
    activation = layer.config["activation"]
    if activation not in DENSE_ACTIVATIONS:
        return y
    over_features = {"axis": -1} if activation == "softmax" else {}  # Keras softmax: the last axis
    return g.add(DENSE_ACTIVATIONS[activation], [y], f"{layer.name}.{activation}", **over_features)


def _check_opset(opset) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset {opset!r} is not supported; choose an int from {MIN_OPSET} to {newest} "
                         f"(default {DEFAULT_OPSET})")


def build_onnx(spec: ModelSpec, opset: int = DEFAULT_OPSET, state_io: bool = False):
    """The ONNX ModelProto for a spec (see the module docstring for its inputs and outputs)."""
    import onnx
    from onnx import TensorProto, helper

    _check_opset(opset)
    shapes = validate(spec)
    _refuse_unexpressible(spec)
    state_dims = carried_state_dims(spec, shapes, state_io)
    g = _Graph([INPUT] + output_names(spec, state_io=True) + [initial_state_name(k) for k in range(len(state_dims))])
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", "time", spec.input_features])]
    x = g.add("Transpose", [INPUT], "time_major", perm=[1, 0, 2])  # (T, B, F): the recurrent nodes' layout
    finals = []  # (B, units) per carry, None where the graph does not need it
    channels_first = False  # x is a (B, C, T) sequence, as convolution and pooling read it
    layers = frontends.fold_batch_norms(spec.layers, shapes)
    for index, (layer, shape) in enumerate(layers):
        if layer.kind in frontends.KINDS:
            history = None
            if state_io and onnx_conv.carries_history(layer):
                history = initial_state_name(len(finals))
                inputs.append(helper.make_tensor_value_info(history, TensorProto.FLOAT,
                                                            ["batch"] + state_dims[len(finals)]))
            x, channels_first, history = onnx_conv.write_layer(g, layer, shape, x, channels_first, history)
            if history:
                finals.append(history)
            continue
        x, channels_first = onnx_conv.time_major(g, x, channels_first), False
        if layer.kind == "dense":
            x = _dense(g, layer, x)
            continue
        initial = []
        for units in shape.state_dims:
            if state_io:
                initial.append(initial_state_name(len(finals) + len(initial)))
                inputs.append(helper.make_tensor_value_info(initial[-1], TensorProto.FLOAT, ["batch", units]))
        is_last = index == len(layers) - 1
        need_carries = state_io or (is_last and spec.output_count > len(main_names(spec)))
        outputs = _recurrent(g, layer, x, initial, need_carries)
        finals += [final for _, carries in outputs for final in carries] if need_carries \
            else [None] * len(shape.state_dims)
        if layer.kind != "bidirectional":
            x = outputs[0][0]
        elif layer.config["merge_mode"] is not None:
            x = _merge(g, layer.config["merge_mode"], outputs[0][0], outputs[1][0], f"{layer.name}.merged")
        else:
            x = [output for output, _ in outputs]  # merge_mode=None is always the last layer
    last = shapes[-1]
    main = x if isinstance(x, list) else [x]
    widths = [config["units"] for config in recurrent_configs(spec.layers[-1])] if isinstance(x, list) \
        else [last.output_dim]
    graph_outputs = []
    # Strided or 'valid' windows return fewer steps than they read.
    time = "time" if all(frontends.window(layer) is None for layer in spec.layers) else "output_time"
    for name, tensor, width in zip(main_names(spec), main, widths):
        if last.output_is_sequence:
            tensor = onnx_conv.batch_major(g, tensor, channels_first, f"{name}.batch_major")  # (B, T, width)
        g.name_output(tensor, name)
        graph_outputs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, ["batch", time, width] if last.output_is_sequence else ["batch", width]))
    for k in returned_states(spec, shapes, state_io):
        g.name_output(finals[k], state_name(k))
        graph_outputs.append(helper.make_tensor_value_info(state_name(k), TensorProto.FLOAT, ["batch"] + state_dims[k]))
    graph = helper.make_graph(g.nodes, "gru_engine", inputs, graph_outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="gru-engine")
    # The oldest IR version that carries this opset, so older runtimes can load the file.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model, full_check=True)
    return model


METHODS = ("native", "tf2onnx")


def resolve_spec(model_or_path) -> ModelSpec:
    """A ModelSpec from a spec, a bundle file (no TensorFlow needed), a Keras model or .keras/.h5 file."""
    if isinstance(model_or_path, ModelSpec):
        return model_or_path
    if isinstance(model_or_path, (str, Path)) and str(model_or_path).endswith(".safetensors"):
        from gru_engine import bundle
        return bundle.read(model_or_path)
    from .keras_reader import read_keras
    return read_keras(model_or_path)


def export_onnx(model_or_path, out_path, method: str = "native", opset: int = DEFAULT_OPSET,
                state_io: bool = False) -> Path:
    """Write an ONNX graph for a Keras model / .keras / .h5 / bundle file / ModelSpec; returns out_path.

    method="native" (default) builds ONNX GRU, LSTM and RNN nodes from the weights, and works from a bundle
    without TensorFlow; method="tf2onnx" runs the standard converter on a Keras model (the
    reference path). The file is written atomically and passes onnx.checker (full_check).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {list(METHODS)}")
    _check_opset(opset)
    if method == "tf2onnx":
        from .tf2onnx_export import convert_tf2onnx
        model = convert_tf2onnx(model_or_path, opset=opset, state_io=state_io)
    else:
        model = build_onnx(resolve_spec(model_or_path), opset=opset, state_io=state_io)
    return atomic_write_bytes(out_path, model.SerializeToString())
