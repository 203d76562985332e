"""What the validation of every layer kind is built from: the shape a layer sees and produces, and
checks that fail naming the layer. It sits below ``spec`` and the layer families ``spec`` hands
their kinds to (``frontends``), so that those import it and never each other in a circle."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import BundleError

# Bounds checked before anything is allocated, so a hostile manifest cannot ask for terabytes.
MAX_UNITS = 16384


@dataclasses.dataclass
class LayerShape:
    """What one layer sees and produces, per sample (time is dynamic)."""

    input_dim: int
    output_dim: int
    input_is_sequence: bool
    output_is_sequence: bool
    state_dims: tuple[int, ...]  # carries this layer keeps, per direction (LSTM: h, then c)
    parameters: int


def fail(layer_index: int | None, message: str) -> None:
    where = "model" if layer_index is None else f"layer {layer_index}"
    raise BundleError(f"{where}: {message}")


def check_keys(index: int, config: Any, keys: dict[str, type], what: str, optional=()) -> None:
    if not isinstance(config, dict):
        fail(index, f"{what} config must be a JSON object, got {type(config).__name__}")
    missing = sorted(set(keys) - set(config))
    extra = sorted(set(config) - set(keys) - set(optional))
    if missing or extra:
        fail(index, f"{what} config has missing fields {missing} and unknown fields {extra}; "
                    f"expected exactly {sorted(keys)}")
    for key, expected in keys.items():
        value = config[key]
        # bool is an int subclass: an int field must not accept True, and vice versa.
        if type(value) is not expected:
            fail(index, f"{what} config field '{key}' must be {expected.__name__}, got {value!r}")


def check_units(index: int, units: int, field: str) -> None:
    if not 1 <= units <= MAX_UNITS:
        fail(index, f"'{field}' is {units}; it must be between 1 and {MAX_UNITS}")
