"""gru-engine: run Keras GRU models on the CPU with numpy and numba only.

    import gru_engine
    model = gru_engine.load("airline.gru.safetensors")   # validates, then replays the self-check
    y = model.predict(x)                                  # x: (batch, time, features)
    stream = model.stream()                               # one time step at a time

    session = gru_engine.InferenceSession("imported.gru.safetensors")  # onnxruntime's interface
    outputs = session.run(None, {"X": x})
"""

from pathlib import Path

from . import bundle
from .errors import BundleError, InputError, UnsupportedModelError
from .runtime import Model, Stream, loads
from .session import InferenceSession
from .spec import ModelSpec

__version__ = "0.1.0"
__all__ = ["load", "loads", "Model", "Stream", "InferenceSession", "ModelSpec", "BundleError", "InputError",
           "UnsupportedModelError",
           "__version__"]


def load(path, verify: bool = True) -> Model:
    """Read a bundle, validate everything, and (``verify``) replay its stored self-check."""
    model = Model(bundle.read(path))
    if verify:
        bundle.self_check(model, Path(path))
    return model

