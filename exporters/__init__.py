"""Readers and writers that need TensorFlow or ONNX; installed as ``gru_engine.exporters``.

TensorFlow, onnx and onnxruntime are imported inside the functions that use them, so importing
this package costs nothing extra.

    from gru_engine.exporters import export_bundle, export_c, export_onnx, import_onnx
    export_bundle("model.keras", "model.gru.safetensors")
    export_onnx("model.gru.safetensors", "model.onnx")           # from a bundle: no TensorFlow needed
    export_c("model.gru.safetensors", "c-out", name="model")     # dependency-free C99
    import_onnx("pytorch_gru.onnx", "pytorch_gru.gru.safetensors")
    session = onnx_session("pytorch_gru.onnx")  # onnxruntime's InferenceSession interface, converted on the fly
"""

from .c_writer import export_c
from .keras_reader import export_bundle, read_keras
from .onnx_reader import import_onnx, onnx_session, read_onnx
from .onnx_writer import export_onnx

__all__ = ["export_bundle", "read_keras", "export_c", "export_onnx", "import_onnx", "onnx_session", "read_onnx"]
