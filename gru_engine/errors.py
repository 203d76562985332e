"""The exceptions gru-engine raises. All are ``ValueError``s with a message that says what to fix."""


FLOAT32_MAX = 3.4028234663852886e38


def is_float32_number(value) -> bool:
    """A JSON number that is finite in float32 (huge JSON integers, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return abs(float(value)) <= FLOAT32_MAX
    except OverflowError:
        return False


class BundleError(ValueError):
    """A model description (a bundle file, or one built by a reader) is malformed or inconsistent."""


class InputError(ValueError):
    """An array handed to ``predict`` or a stream has the wrong shape, dtype or values."""


class UnsupportedModelError(ValueError):
    """A source model (Keras, ONNX) uses a layer or option the engine cannot reproduce exactly."""
