"""The ONNX graph interface every ONNX writer here produces: names, opsets, output order.

The native writer (``onnx_writer``) and the tf2onnx path (``tf2onnx_export``) both name their
inputs and outputs from here, so callers can swap one graph for the other. See ``onnx_writer`` for
what each name holds.
"""

from __future__ import annotations

from gru_engine import frontends
from gru_engine.spec import ModelSpec, validate

from . import onnx_conv

DEFAULT_OPSET = 17
# Squeeze/Unsqueeze take their axes as inputs from opset 13 on; the native writer uses that form.
MIN_OPSET = 13
INPUT = "input"
OUTPUT = "output"


def initial_state_name(k: int) -> str:
    return f"initial_state_{k}"


def state_name(k: int) -> str:
    return f"state_{k}"


def main_names(spec: ModelSpec) -> list[str]:
    last = spec.layers[-1]
    if last.kind == "bidirectional" and last.config["merge_mode"] is None:
        return [f"{OUTPUT}_forward", f"{OUTPUT}_backward"]
    return [OUTPUT]


def carried_state_dims(spec: ModelSpec, shapes, state_io: bool) -> list[list[int]]:
    """Per carried state k, its dims after batch: (units,) per GRU direction and, with state_io, the
    (steps, channels) history of each causal Conv1D, in layer order (as ``Stream.state``)."""
    dims = []
    for layer, shape in zip(spec.layers, shapes):
        if state_io and onnx_conv.carries_history(layer):
            dims.append([frontends.history_steps(layer), shape.input_dim])
        dims += [[units] for units in shape.state_dims]
    return dims


def returned_states(spec: ModelSpec, shapes, state_io: bool) -> range:
    """Which carried states the graph returns (k counts them in layer order, see ``carried_state_dims``)."""
    count = len(carried_state_dims(spec, shapes, state_io))
    if state_io:
        return range(count)
    if spec.output_count > len(main_names(spec)):  # Keras return_state: the last layer's carries
        return range(count - len(shapes[-1].state_dims), count)
    return range(0)


def output_names(spec: ModelSpec, state_io: bool = False) -> list[str]:
    """The graph's output names, in order (see ``onnx_writer``'s docstring)."""
    return main_names(spec) + [state_name(k) for k in returned_states(spec, validate(spec), state_io)]
