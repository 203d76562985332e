"""An imported ONNX graph's interface: how its inputs feed ``Model.predict`` and how its outputs are
built from what ``predict`` returns. A bundle written by ``import_onnx`` records it (format version 2)
so that ``gru_engine.InferenceSession`` answers exactly as onnxruntime does on the original graph.

    {"inputs":  [{"name": "X", "role": "x", "axes": ["time", "batch", "features"], "shape": [null, 1, 3]},
                 {"name": "seq", "role": "lengths", "axes": ["batch"], "shape": [1]},
                 {"name": "h0", "role": "initial_h", "axes": ["direction", "batch", "features"], ...}],
     "outputs": [{"name": "Y", "parts": [0, 1], "axes": ["time", "direction", "batch", "features"],
                  "reverse_time": false, "shape": [...]}],
     "initial_state": [null | {"input": "h0", "index": 0} | {"values": [[...], ...]}, ...],
     "lengths": null | {"input": "seq"} | {"values": [3, 2]}}

Axis labels: batch, time, features, direction (the GRU directions, stacked), "1" (a size-1 axis).
An output stacks ``predict``'s outputs ``parts`` along its direction axis (one part without one),
reversed in time first when ``reverse_time``; a part numbered past predict's outputs is a final
carry (output count + k: the carry of GRU direction k, in layer order); ``initial_state`` has one entry per carry of the
model (each GRU direction, in layer order): zero (null), a slice of a graph input along its
direction axis, or constant values (batch, units); ``lengths`` feeds ``predict(lengths=...)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BundleError

BATCH, TIME, FEATURE, DIRECTION, ONE = "batch", "time", "features", "direction", "1"
LABELS = (BATCH, TIME, FEATURE, DIRECTION, ONE)
ROLES = ("x", "lengths", "initial_h")
INTERFACE_KEYS = {"inputs", "outputs", "initial_state", "lengths"}
MAX_CONSTANT_VALUES = 1 << 20
MAX_ENTRIES = 4096


def _fail(message: str) -> None:
    raise BundleError(f"interface: {message}")


def _check_fields(entry: Any, required: set, what: str) -> None:
    if not isinstance(entry, dict) or set(entry) != required:
        _fail(f"{what} must be an object with exactly the fields {sorted(required)}, got {str(entry)[:120]}")


def _is_int(value) -> bool:
    return type(value) is int


def _check_shape(shape, rank: int, what: str) -> None:
    if not isinstance(shape, list) or len(shape) != rank or not all(
            d is None or isinstance(d, str) or (_is_int(d) and 0 < d <= 1 << 40) for d in shape):
        _fail(f"{what} shape must be a list of {rank} positive ints, names or nulls, got {str(shape)[:80]}")


def _check_axes(axes, allowed: tuple, what: str) -> None:
    if not isinstance(axes, list) or not all(isinstance(a, str) and a in LABELS for a in axes):
        _fail(f"{what} axes must be a list of {list(LABELS)}, got {str(axes)[:80]}")
    core = sorted(a for a in axes if a != ONE)
    if core != sorted(allowed) or len(axes) > 8:
        _fail(f"{what} axes {axes} must be a permutation of {list(allowed)}, with size-1 axes ('1') between")


def _has_direction(axes) -> bool:
    return isinstance(axes, list) and DIRECTION in axes


def _constant(values, shape: tuple, kind: str, what: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) > MAX_CONSTANT_VALUES:
        _fail(f"{what} must be a (nested) list of numbers")
    try:
        array = np.array(values, dtype=np.float64 if kind == "f" else object)
    except (ValueError, TypeError, OverflowError, RecursionError):
        _fail(f"{what} is not a rectangular list of numbers")
    if array.shape != shape or array.size > MAX_CONSTANT_VALUES:
        _fail(f"{what} has shape {array.shape}, expected {shape}")
    if kind == "f":
        if not np.isfinite(array).all() or np.abs(array).max(initial=0) > 3.4e38:
            _fail(f"{what} holds non-finite values")
        return array.astype(np.float32)
    if not all(_is_int(v) and 1 <= v <= 1 << 40 for v in array.reshape(-1)):
        _fail(f"{what} must hold positive integers")
    return array.astype(np.int64)


def validate_interface(spec, shapes, predicted) -> None:
    """Check every field of ``spec.interface`` against the model, so the session can trust it.
    ``predicted``: the shapes ``predict`` returns for a batch of 1 and 2 steps (``spec.output_shapes``)."""
    interface = spec.interface
    _check_fields(interface, INTERFACE_KEYS, "the interface")
    inputs, outputs = interface["inputs"], interface["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not 1 <= len(inputs) <= MAX_ENTRIES \
            or not 1 <= len(outputs) <= MAX_ENTRIES:
        _fail("inputs and outputs must be non-empty lists")
    names = set()
    by_name = {}
    for index, entry in enumerate(inputs):
        _check_fields(entry, {"name", "role", "axes", "shape"}, f"input {index}")
        if not isinstance(entry["name"], str) or not entry["name"] or entry["name"] in names:
            _fail("input names must be unique non-empty strings")
        if entry["role"] not in ROLES:
            _fail(f"input {index} role {entry['role']!r:.40} is not one of {list(ROLES)}")
        allowed = {"x": (BATCH, TIME, FEATURE), "lengths": (BATCH,),
                   "initial_h": (DIRECTION, BATCH, FEATURE) if _has_direction(entry["axes"])
                   else (BATCH, FEATURE)}[entry["role"]]
        _check_axes(entry["axes"], allowed, f"input {index}")
        _check_shape(entry["shape"], len(entry["axes"]), f"input {index}")
        by_name[entry["name"]] = entry
        names.add(entry["name"])
    roles = [entry["role"] for entry in inputs]
    if roles.count("x") != 1 or roles.count("lengths") > 1:
        _fail("the graph needs exactly one 'x' input and at most one 'lengths' input")
    x_entry = next(entry for entry in inputs if entry["role"] == "x")
    feature_dim = x_entry["shape"][x_entry["axes"].index(FEATURE)]
    if feature_dim != spec.input_features:
        _fail(f"input '{x_entry['name']}' has {feature_dim} features; the model takes {spec.input_features}")

    carries = [units for shape in shapes for units in shape.state_dims]
    main_shapes = predicted + [(1, units) for units in carries]
    out_names = set()
    for index, entry in enumerate(outputs):
        _check_fields(entry, {"name", "parts", "axes", "reverse_time", "shape"}, f"output {index}")
        parts = entry["parts"]
        if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_ENTRIES or not all(
                _is_int(p) and 0 <= p < len(main_shapes) for p in parts):
            _fail(f"output {index} parts must be a list of indices below {len(main_shapes)}, got {str(parts)[:80]}")
        ranks = {len(main_shapes[p]) for p in parts}
        widths = {main_shapes[p][-1] for p in parts}
        if len(ranks) != 1 or (len(parts) > 1 and len(widths) != 1):
            _fail(f"output {index} stacks outputs of different shapes")
        core = (BATCH, TIME, FEATURE) if ranks == {3} else (BATCH, FEATURE)
        stacked = _has_direction(entry["axes"])
        if len(parts) > 1 and not stacked:
            _fail(f"output {index} has several parts and no direction axis to stack them on")
        _check_axes(entry["axes"], core + ((DIRECTION,) if stacked else ()), f"output {index}")
        _check_shape(entry["shape"], len(entry["axes"]), f"output {index}")
        if type(entry["reverse_time"]) is not bool or (entry["reverse_time"] and ranks != {3}):
            _fail(f"output {index} reverse_time must be a bool, true only for a sequence")
        if not isinstance(entry["name"], str) or not entry["name"] or entry["name"] in out_names:
            _fail("output names must be unique non-empty strings")
        out_names.add(entry["name"])

    states = interface["initial_state"]
    if not isinstance(states, list) or len(states) != len(carries):
        _fail(f"initial_state must list {len(carries)} entries, one per GRU direction")
    for index, (state, units) in enumerate(zip(states, carries)):
        if state is None:
            continue
        if isinstance(state, dict) and set(state) == {"input", "index"}:
            source = by_name.get(state["input"]) if isinstance(state["input"], str) else None
            if source is None or source["role"] != "initial_h":
                _fail(f"initial_state {index} names no initial_h input")
            axes, dims = source["axes"], source["shape"]
            # The direction index along the input's direction axis; null for a (batch, units) input.
            count = dims[axes.index(DIRECTION)] if DIRECTION in axes else None
            position = state["index"]
            in_range = position is None if count is None else _is_int(position) and _is_int(count) \
                and 0 <= position < count
            if not in_range or dims[axes.index(FEATURE)] != units:
                _fail(f"initial_state {index} reads direction {state['index']} of '{source['name']}' "
                      f"(shape {dims}); the carry has {units} units")
        elif isinstance(state, dict) and set(state) == {"values"}:
            rows = state["values"] if isinstance(state["values"], list) else None
            _constant(rows, (len(rows) if rows else 0, units), "f", f"initial_state {index} values")
        else:
            _fail(f"initial_state {index} must be null, {{input, index}} or {{values}}")
    lengths = interface["lengths"]
    if lengths is not None:
        if isinstance(lengths, dict) and set(lengths) == {"input"}:
            source = by_name.get(lengths["input"]) if isinstance(lengths["input"], str) else None
            if source is None or source["role"] != "lengths":
                _fail("lengths names no lengths input")
        elif isinstance(lengths, dict) and set(lengths) == {"values"} and isinstance(lengths["values"], list):
            _constant(lengths["values"], (len(lengths["values"]),), "i", "lengths values")
        else:
            _fail("lengths must be null, {input} or {values}")


def constants(interface: dict) -> tuple[list, np.ndarray | None]:
    """The constant initial states (None where not constant) and constant lengths of a valid interface."""
    states = [np.float32(s["values"]) if s is not None and "values" in s else None
              for s in interface["initial_state"]]
    lengths = interface["lengths"]
    return states, (np.int64(lengths["values"]) if lengths is not None and "values" in lengths else None)


def canonical(array: np.ndarray, axes: list, core: tuple) -> np.ndarray:
    """A graph tensor with ``axes`` as the same data with axes ``core`` (size-1 axes dropped)."""
    kept = [a for a in axes if a != ONE]
    squeezed = array.reshape([size for size, a in zip(array.shape, axes) if a != ONE])
    return squeezed.transpose([kept.index(a) for a in core])


def arrange(array: np.ndarray, core: tuple, axes: list) -> np.ndarray:
    """``canonical``'s inverse: data with axes ``core`` laid out as ``axes``."""
    kept = [a for a in axes if a != ONE]
    moved = array.transpose([core.index(a) for a in kept])
    sizes = iter(moved.shape)
    return np.ascontiguousarray(moved.reshape([1 if a == ONE else next(sizes) for a in axes]))


def part_axes(rank: int) -> tuple:
    return (BATCH, TIME, FEATURE) if rank == 3 else (BATCH, FEATURE)


def graph_output(entry: dict, outputs: list) -> np.ndarray:
    """One graph output built from ``predict``'s outputs followed by the final carries."""
    parts = [outputs[p] for p in entry["parts"]]
    core = part_axes(parts[0].ndim)
    if entry["reverse_time"]:
        parts = [part[:, ::-1] for part in parts]
    if DIRECTION in entry["axes"]:
        stacked = parts[0][None] if len(parts) == 1 else np.stack(parts)  # a view when there is one
        return arrange(stacked, (DIRECTION,) + core, entry["axes"])
    return arrange(parts[0], core, entry["axes"])


def predict_outputs(interface: dict, graph_outputs: list, count: int) -> list:
    """``graph_output``'s inverse: the ``count`` outputs of ``predict`` the graph's outputs hold."""
    found = [None] * count
    for entry, array in zip(interface["outputs"], graph_outputs):
        axes = entry["axes"]
        stacked = DIRECTION in axes
        rank = len([a for a in axes if a != ONE]) - stacked
        core = part_axes(rank)
        data = canonical(array, axes, (DIRECTION,) + core) if stacked else canonical(array, axes, core)[None]
        for part, piece in zip(entry["parts"], data):
            if part >= count:  # a carry: not among predict's outputs
                continue
            found[part] = np.ascontiguousarray(piece[:, ::-1] if entry["reverse_time"] else piece, np.float32)
    return found
