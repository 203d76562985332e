"""The exceptions gru-engine raises. All are ``ValueError``s with a message that says what to fix."""


class BundleError(ValueError):
    """A model description (a bundle file, or one built by a reader) is malformed or inconsistent."""


class InputError(ValueError):
    """An array handed to ``predict`` or a stream has the wrong shape, dtype or values."""


class UnsupportedModelError(ValueError):
    """A source model (Keras, ONNX) uses a layer or option the engine cannot reproduce exactly."""
