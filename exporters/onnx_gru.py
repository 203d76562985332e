"""The ONNX GRU node -> one engine GRU direction per ONNX direction.

ONNX GRU (gates z, r, h; f = activations[0], g = activations[1] of each direction):

    z  = f(X W_z + H R_z + Wb_z + Rb_z)        r = f(X W_r + H R_r + Wb_r + Rb_r)
    linear_before_reset=0:  hh = g(X W_h + (r * H) R_h + Wb_h + Rb_h)
    linear_before_reset=1:  hh = g(X W_h + r * (H R_h + Rb_h) + Wb_h)
    H' = (1 - z) * hh + z * H           clip: every pre-activation clipped to [-clip, clip]

which is the Keras cell with kernel = W.T, recurrent_kernel = R.T, recurrent_activation f and
activation g (reset_after = linear_before_reset).
"""

from __future__ import annotations

import warnings

import numpy as np

from .onnx_values import BATCH, DIRECTION, FEATURE, TIME, _Chain, _Const, _describe, _Direction, _Lengths, \
    _Recurrent, _StateInput, _Zeros

GRU_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
                  "layout", "linear_before_reset"}
# ONNX activation (lower case) -> the spec's name.
ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "hardsigmoid": "hard_sigmoid",
               "affine": "affine", "leakyrelu": "leaky_relu", "thresholdedrelu": "thresholded_relu",
               "scaledtanh": "scaled_tanh", "elu": "elu", "softsign": "softsign", "softplus": "softplus"}
# The parameters each function consumes from activation_alpha / activation_beta (each list in order,
# separately), and the values onnxruntime uses when a list runs out: ONNX's defaults where the
# operators have them (LeakyRelu, HardSigmoid, Elu), else 0.
ONNX_PARAMETERS = {"hard_sigmoid": (0.2, 0.5), "affine": (0.0, 0.0), "leaky_relu": (0.01, None),
                   "thresholded_relu": (0.0, None), "scaled_tanh": (0.0, 0.0), "elu": (1.0, None)}
# Parameter values at which a function is one of Keras's, run on the plain path.
KERAS_EQUIVALENT = {("hard_sigmoid", np.float32(1 / 6), np.float32(0.5)): "hard_sigmoid",
                    ("affine", np.float32(1.0), np.float32(0.0)): "linear"}


class SwappedInput(Exception):
    """The model input reaches the first GRU with batch and time the other way round: it is time-major."""


class GruOps:
    """The reader's GRU handler."""

    def _op_GRU(self, operands, attributes):
        unknown = sorted(set(attributes) - GRU_ATTRIBUTES)
        if unknown:
            self.malformed(f"unknown attributes {unknown}")
        layout = attributes.get("layout", 0)
        if layout not in (0, 1):
            self.malformed(f"layout is {layout}; it must be 0 (time, batch, features) or 1 (batch, time, features)")
        clip = attributes.get("clip")
        if clip is not None and not (np.isfinite(clip) and clip > 0):
            self.malformed(f"clip is {clip}; it must be a positive number")
        operands = operands + [None] * (6 - len(operands))
        x, w, r, b, sequence_lens, initial_h = operands[:6]
        x = self.chain(x)
        expected = (TIME, BATCH, FEATURE) if layout == 0 else (BATCH, TIME, FEATURE)
        if x.axes != expected:
            if not x.layers and x.axes == (expected[1], expected[0], FEATURE) and not self.input_settled:
                raise SwappedInput()
            self.fail(f"input X has axes ({', '.join(x.axes)}); a GRU with layout={layout} reads "
                      f"({', '.join(expected)})")
        self.input_settled = True
        direction = attributes.get("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            self.malformed(f"direction {direction!r} is not forward, reverse or bidirectional")
        count = 2 if direction == "bidirectional" else 1
        w, r = self.constant(w, "W"), self.constant(r, "R")
        b = None if b is None else self.constant(b, "B")
        units = r.shape[-1] if r.ndim == 3 else -1
        shapes = {"W": (w, (count, 3 * units, x.width)), "R": (r, (count, 3 * units, units)),
                  "B": (b, (count, 6 * units))}
        for name, (array, shape) in shapes.items():
            if array is not None and (array.shape != shape or array.dtype != np.float32):
                self.malformed(f"{name} is {array.dtype} {array.shape}; expected float32 {shape} "
                               f"({count} direction(s), hidden size {units}, input size {x.width})")
            if array is not None and not np.isfinite(array).all():
                self.malformed(f"{name} contains NaN or infinite values")
        if attributes.get("hidden_size", units) != units:
            self.malformed(f"hidden_size {attributes['hidden_size']} disagrees with R's hidden size {units}")
        linear_before_reset = attributes.get("linear_before_reset", 0)
        if linear_before_reset not in (0, 1):
            self.malformed(f"linear_before_reset is {linear_before_reset}; it must be 0 or 1")
        if not linear_before_reset and self.producer.lower().startswith("pytorch"):
            warnings.warn(f"{self.where()}: linear_before_reset=0 in a graph written by PyTorch, whose nn.GRU "
                          "computes linear_before_reset=1 (onnxscript before 0.7.1 exported it so): imported "
                          "as the graph says, which differs from the PyTorch module; re-export with "
                          "onnxscript >= 0.7.1 to match it", stacklevel=2)
        self._read_lengths(sequence_lens, x)
        initial = self._initial_sources(initial_h, count, units, layout)
        activations = self._activations(attributes, count)
        directions = []
        for d in range(count):
            reverse = direction == "reverse" or d == 1
            (recurrent_activation, f_params), (activation, g_params) = activations[2 * d:2 * d + 2]
            config = {"units": int(units), "activation": activation, "recurrent_activation": recurrent_activation,
                      "use_bias": b is not None, "reset_after": linear_before_reset == 1,
                      "return_sequences": False, "return_state": False, "go_backwards": reverse != x.flipped,
                      "zero_output_for_mask": True, "stateful": False}
            config.update({f"recurrent_activation_{k}": v for k, v in f_params.items()})
            config.update({f"activation_{k}": v for k, v in g_params.items()})
            if clip is not None:
                config["clip"] = float(np.float32(clip))
            weights = {"kernel": np.ascontiguousarray(w[d].T), "recurrent_kernel": np.ascontiguousarray(r[d].T)}
            if b is not None:
                input_bias, recurrent_bias = b[d, :3 * units], b[d, 3 * units:]
                weights["bias"] = np.stack([input_bias, recurrent_bias]) if linear_before_reset \
                    else input_bias + recurrent_bias
            key = (self.node_index, d)
            self.initial_states[key] = initial[d]
            directions.append(_Direction(self.layer_name(), key, config, weights, x, reverse))
        directions = tuple(directions)
        y_axes = (TIME, DIRECTION, BATCH, FEATURE) if layout == 0 else (BATCH, TIME, DIRECTION, FEATURE)
        y_h_axes = (DIRECTION, BATCH, FEATURE) if layout == 0 else (BATCH, DIRECTION, FEATURE)
        return [_Recurrent(directions, y_axes, sequence=True),
                _Recurrent(directions, y_h_axes, sequence=False, state=True)]

    def _read_lengths(self, sequence_lens, x: _Chain) -> None:
        """Every GRU must take the same sequence_lens: a graph input, a constant, or none."""
        if sequence_lens is None:
            source = None
        elif isinstance(sequence_lens, _Lengths):
            source = {"input": sequence_lens.name}
        elif isinstance(sequence_lens, _Const) and sequence_lens.array.ndim == 1 \
                and sequence_lens.array.dtype.kind in "iu":
            values = [int(v) for v in sequence_lens.array]
            if min(values, default=0) < 1:
                self.malformed(f"sequence_lens holds {min(values, default=0)}; each length must be at least 1")
            source = {"values": values}
        else:
            self.fail(f"sequence_lens is {_describe(sequence_lens)}; it must be a graph input or a constant "
                      "int32 (batch,) vector")
        if source is not None and x.flipped:
            self.fail("with sequence_lens, a GRU cannot read a sequence reversed in time (the output of a "
                      "reverse direction taken alone): the padding would come first")
        if self.gru_count and source != self.lengths:
            self.fail("every GRU of the graph must take the same sequence_lens (or none), so that the padding "
                      "of each sample is the same throughout")
        self.gru_count += 1
        self.lengths = source

    def _initial_sources(self, initial_h, count: int, units: int, layout: int) -> list:
        """Per direction: None (zeros), {"input", "index"} or {"values"} (batch, units)."""
        if initial_h is None or isinstance(initial_h, _Zeros):
            return [None] * count
        if isinstance(initial_h, _Const):
            array = initial_h.array
            stacked = array if layout == 0 else array.swapaxes(0, 1) if array.ndim == 3 else array
            if array.dtype != np.float32 or stacked.ndim != 3 or stacked.shape[0] != count \
                    or stacked.shape[2] != units or not np.isfinite(array).all():
                self.malformed(f"initial_h is a constant {array.dtype} {array.shape}; expected finite float32 "
                               f"{(count, 'batch', units) if layout == 0 else ('batch', count, units)}")
            if not np.any(stacked):
                return [None] * count
            return [{"values": stacked[d].astype(np.float64).tolist()} for d in range(count)]
        if isinstance(initial_h, _StateInput):
            state = initial_h
            if layout == 1 and state.raw_dims is not None and len(state.raw_dims) == 3:
                # A graph input read by a batch-major GRU is (batch, directions, units).
                state = _StateInput((BATCH, DIRECTION, FEATURE),
                                    tuple((state.sources[0][0], i) for i in range(state.raw_dims[1] or 0)))
                self._state_axes(state.sources[0][0], (BATCH, DIRECTION, FEATURE))
            elif state.raw_dims is not None:
                self._state_axes(state.sources[0][0], state.axes)
            expected = (DIRECTION, BATCH, FEATURE) if layout == 0 else (BATCH, DIRECTION, FEATURE)
            if state.axes == expected and len(state.sources) == count:
                return [{"input": name, "index": index} for name, index in state.sources]
        self.fail(f"initial_h is {_describe(initial_h)}; expected a constant or a graph input of "
                  f"{count} direction(s), batch and {units} units (layout={layout})")

    def _state_axes(self, name: str, axes: tuple) -> None:
        if self.state_axes.setdefault(name, axes) != axes:
            self.fail(f"input '{name}' is read as initial_h in two layouts")

    def _activations(self, attributes, count: int, per_direction: int = 2) -> list[tuple[str, dict]]:
        """ONNX activations (GRU [f, g], LSTM [f, g, h], RNN [f] per direction) -> (spec name, its
        parameters); activation_alpha and activation_beta are consumed in order, each only by the
        functions that take it."""
        defaults = {1: ["Tanh"], 2: ["Sigmoid", "Tanh"], 3: ["Sigmoid", "Tanh", "Tanh"]}[per_direction]
        names = attributes.get("activations", defaults * count)
        alphas = list(attributes.get("activation_alpha", []))
        betas = list(attributes.get("activation_beta", []))
        if len(names) != per_direction * count:
            self.malformed(f"{len(names)} activations for {count} direction(s); an {self.node.op_type} takes "
                           f"{per_direction} per direction")
        result = []
        for name in names:
            spec_name = ACTIVATIONS.get(str(name).lower())
            if spec_name is None:
                self.fail(f"activation {name} is not one of ONNX's RNN activations; supported: "
                          "Relu, Tanh, Sigmoid, Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, "
                          "Softsign, Softplus")
            alpha, beta = ONNX_PARAMETERS.get(spec_name, (None, None))
            alpha = None if alpha is None else np.float32(alphas.pop(0) if alphas else alpha)
            beta = None if beta is None else np.float32(betas.pop(0) if betas else beta)
            if not all(v is None or np.isfinite(v) for v in (alpha, beta)):
                self.malformed(f"activation {name} has a non-finite alpha or beta")
            keras_name = KERAS_EQUIVALENT.get((spec_name, alpha, beta))
            if keras_name is not None:
                result.append((keras_name, {}))
                continue
            params = {key: float(value) for key, value in (("alpha", alpha), ("beta", beta)) if value is not None}
            result.append((spec_name, params))
        return result
