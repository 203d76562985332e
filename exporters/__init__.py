"""Readers and writers that need TensorFlow or ONNX; installed as ``gru_engine.exporters``.

    from gru_engine.exporters import export_bundle
    export_bundle("model.keras", "model.gru.safetensors")
"""

from .keras_reader import export_bundle, read_keras

__all__ = ["export_bundle", "read_keras"]

from .onnx_reader import import_onnx, read_onnx  # noqa: E402  (ONNX: onnx/onnxruntime imported when called)
from .onnx_writer import export_onnx  # noqa: E402

__all__ += ["export_onnx", "import_onnx", "read_onnx"]
