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

from .onnx_recurrent import COMMON_ATTRIBUTES, directions, read_activations, read_node, record_initial_states

GRU_ATTRIBUTES = COMMON_ATTRIBUTES | {"linear_before_reset"}


def read_gru(reader, operands, attributes) -> list:
    """An ONNX GRU node: Y, Y_h."""
    operands = operands + [None] * (6 - len(operands))
    node = read_node(reader, operands, attributes, GRU_ATTRIBUTES, 3, layouts=(0, 1))
    clip = attributes.get("clip")
    if clip is not None and not (np.isfinite(clip) and clip > 0):
        reader.malformed(f"clip is {clip}; it must be a positive number")
    linear_before_reset = attributes.get("linear_before_reset", 0)
    if linear_before_reset not in (0, 1):
        reader.malformed(f"linear_before_reset is {linear_before_reset}; it must be 0 or 1")
    if not linear_before_reset and reader.producer.lower().startswith("pytorch"):
        warnings.warn(f"{reader.where()}: linear_before_reset=0 in a graph written by PyTorch, whose nn.GRU "
                      "computes linear_before_reset=1 (onnxscript before 0.7.1 exported it so): imported "
                      "as the graph says, which differs from the PyTorch module; re-export with "
                      "onnxscript >= 0.7.1 to match it", stacklevel=2)
    record_initial_states(reader, node, operands[5])
    activations = read_activations(reader, attributes, node.count, 2)
    units, b = node.units, node.b
    configs, weights = [], []
    for d in range(node.count):
        (recurrent_activation, f_params), (activation, g_params) = activations[2 * d:2 * d + 2]
        config = {"activation": activation, "recurrent_activation": recurrent_activation,
                  "reset_after": linear_before_reset == 1, "zero_output_for_mask": True}
        config.update({f"recurrent_activation_{k}": v for k, v in f_params.items()})
        config.update({f"activation_{k}": v for k, v in g_params.items()})
        if clip is not None:
            config["clip"] = float(np.float32(clip))
        configs.append(config)
        tensors = {"kernel": np.ascontiguousarray(node.w[d].T), "recurrent_kernel": np.ascontiguousarray(node.r[d].T)}
        if b is not None:
            input_bias, recurrent_bias = b[d, :3 * units], b[d, 3 * units:]
            tensors["bias"] = np.stack([input_bias, recurrent_bias]) if linear_before_reset \
                else input_bias + recurrent_bias
        weights.append(tensors)
    return directions(reader, node, "gru", configs, weights, 1)
