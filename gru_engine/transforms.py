"""Declarative input/output transforms stored in a bundle's manifest: data, never code.

A bundle may list steps applied to the input, in order, before the network runs; each step that
says ``invert_output`` is undone on the network's main output, in reverse order. So a model trained
on scaled values takes and returns the user's own units.

- ``{"kind": "affine", "scale": [F], "offset": [F], "output_scale": [D] | null, "output_offset": [D] | null}``:
  x' = x * scale + offset; the output is inverted with y = (y' - output_offset) / output_scale.
- ``{"kind": "log", "invert_output": bool}``: x' = log(x) (x must be > 0); output y = exp(y').
- ``{"kind": "center", "invert_output": bool, "output_features": [D]}``: x' = x - mean of x over the
  window, per feature; output y = y' + that mean of input feature ``output_features[d]``.
  It looks at the whole window, so a model with it cannot stream.

The compiled runtime folds affine steps into the weights where it can and runs the rest inside
its compiled call (``gru_engine.folding``).
"""

from __future__ import annotations

from .errors import BundleError, is_float32_number

MAX_STEPS = 16
STEP_KEYS = {
    "affine": {"kind", "scale", "offset", "output_scale", "output_offset"},
    "log": {"kind", "invert_output"},
    "center": {"kind", "invert_output", "output_features"},
}


def _numbers(step_index, name, values, length, nonzero=False):
    if not isinstance(values, list) or len(values) != length or not all(is_float32_number(v) for v in values):
        raise BundleError(f"transform {step_index}: '{name}' must be a list of {length} numbers finite in float32")
    if nonzero and any(v == 0 for v in values):
        raise BundleError(f"transform {step_index}: '{name}' must not contain 0 (it is divided by)")


def validate(steps, input_features: int, output_dim: int) -> None:
    """Refuse any transform list that is not exactly one of the documented forms."""
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise BundleError(f"transforms must be a list of at most {MAX_STEPS} steps")
    for index, step in enumerate(steps):
        kind = step.get("kind") if isinstance(step, dict) else None
        if not isinstance(kind, str) or kind not in STEP_KEYS:
            raise BundleError(f"transform {index}: kind {kind!r} is unknown; supported: {sorted(STEP_KEYS)}")
        if set(step) != STEP_KEYS[kind]:
            raise BundleError(f"transform {index} ({kind}) must have exactly the fields {sorted(STEP_KEYS[kind])}")
        if kind == "affine":
            _numbers(index, "scale", step["scale"], input_features, nonzero=True)
            _numbers(index, "offset", step["offset"], input_features)
            if (step["output_scale"] is None) != (step["output_offset"] is None):
                raise BundleError(f"transform {index}: output_scale and output_offset go together")
            if step["output_scale"] is not None:
                _numbers(index, "output_scale", step["output_scale"], output_dim, nonzero=True)
                _numbers(index, "output_offset", step["output_offset"], output_dim)
            continue
        if not isinstance(step["invert_output"], bool):
            raise BundleError(f"transform {index}: 'invert_output' must be true or false")
        if kind == "center":
            features = step["output_features"]
            if not isinstance(features, list) or len(features) != output_dim or not all(
                    isinstance(f, int) and not isinstance(f, bool) and 0 <= f < input_features for f in features):
                raise BundleError(f"transform {index}: 'output_features' must list {output_dim} input "
                                  f"feature indices in [0, {input_features})")


def streamable(steps) -> bool:
    return not any(step["kind"] == "center" for step in steps)
