"""Keras model -> ONNX through the standard tf2onnx converter: the reference path, not the default.

``tf2onnx.convert.from_keras`` does not work with Keras 3 models, so the model is wrapped in a
``tf.function`` with an input signature (batch dynamic; time dynamic unless the Keras Input fixes
it) and converted with ``tf2onnx.convert.from_function``. TensorFlow's GRU loop becomes an ONNX
Loop, so this path also reproduces Keras masking. Inputs and outputs get the names the native
graph uses (``input``, ``output`` ..., see ``onnx_interface``), so callers can swap one for the other.
"""

from __future__ import annotations

from gru_engine.errors import UnsupportedModelError
from gru_engine.spec import ModelSpec, recurrent_configs

from .keras_reader import load_keras, read_keras
from .onnx_interface import DEFAULT_OPSET, INPUT, output_names


def _rename_outputs(model, names: list[str]) -> None:
    """Rename the graph outputs, in order, wherever the main graph mentions them."""
    graph = model.graph
    if len(graph.output) != len(names):
        raise UnsupportedModelError(f"tf2onnx produced {len(graph.output)} outputs; the Keras model has "
                                    f"{len(names)} ({names})")
    renames = {output.name: name for output, name in zip(graph.output, names)}
    for node in graph.node:
        node.input[:] = [renames.get(value, value) for value in node.input]
        node.output[:] = [renames.get(value, value) for value in node.output]
    for info in list(graph.output) + list(graph.value_info):
        info.name = renames.get(info.name, info.name)


def convert_tf2onnx(model_or_path, opset: int = DEFAULT_OPSET, state_io: bool = False):
    """The tf2onnx ModelProto of a Keras model (object or .keras/.h5 file), checked by onnx.checker."""
    if state_io:
        raise ValueError("state_io=True needs method='native' (the tf2onnx graph has no state inputs)")
    if isinstance(model_or_path, ModelSpec) or str(model_or_path).endswith(".safetensors"):
        raise ValueError("method='tf2onnx' converts a Keras model, and a bundle has none; use method='native', "
                         "or pass the .keras/.h5 file")
    import onnx
    import tensorflow as tf
    import tf2onnx

    model = load_keras(model_or_path)
    spec = read_keras(model)  # refuses anything gru-engine does not run, and names the outputs
    for layer in spec.layers:
        if any(config["stateful"] for config in recurrent_configs(layer)):
            raise UnsupportedModelError(f"layer '{layer.name}' is stateful: tf2onnx would freeze its carried "
                                        "state into the graph; use method='native' (state_io=True streams)")
    steps = model.inputs[0].shape[1]  # None unless the Keras Input fixes the time axis
    signature = [tf.TensorSpec([None, steps, spec.input_features], tf.float32, name=INPUT)]
    function = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    _rename_outputs(proto, output_names(spec))
    onnx.checker.check_model(proto, full_check=True)
    return proto

