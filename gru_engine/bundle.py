"""The weight bundle: one safetensors file, a JSON manifest in its metadata, weights memory-mapped.

Layout (safetensors): 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw little-endian float32 data. The header's
``__metadata__`` holds one key, ``gru_engine``, whose value is the manifest:

    {"format": "gru-engine-bundle", "format_version": 1, "dtype": "float32",
     "input_features": F, "source": {"framework": ..., "version": ...},
     "layers": [{"kind": ..., "name": ..., "config": {...}}, ...],
     "transforms": [...], "self_check": true | false}

A bundle imported from an ONNX graph also holds ``"interface"`` (see ``gru_engine.interface``) and is
written as format version 2; every other bundle stays version 1, readable by older releases.

Tensors are named ``layers.<i>.<weight>`` (``layers.<i>.forward.kernel`` for Bidirectional),
``self_check.input`` and ``self_check.output.<k>``. The header is parsed here, not by a library,
so every offset is checked before any byte of data is touched.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from .errors import BundleError
from .fileio import atomic_write_bytes
from .spec import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS, Layer, ModelSpec, max_excess, validate

METADATA_KEY = "gru_engine"
MAX_HEADER_BYTES = 16 << 20
MANIFEST_KEYS = {"format", "format_version", "dtype", "input_features", "source", "layers", "transforms",
                 "self_check"}
# What each format version adds to the manifest.
VERSION_KEYS = {1: MANIFEST_KEYS, 2: MANIFEST_KEYS | {"interface"}}


def to_bytes(spec: ModelSpec) -> bytes:
    """Serialise a validated spec."""
    from safetensors.numpy import save

    validate(spec)
    tensors = {}
    for index, layer in enumerate(spec.layers):
        for name, array in layer.weights.items():
            tensors[f"layers.{index}.{name}"] = np.ascontiguousarray(array, np.float32)
    has_check = spec.self_check_input is not None
    if has_check:
        tensors["self_check.input"] = np.ascontiguousarray(spec.self_check_input)
        for index, output in enumerate(spec.self_check_outputs):
            tensors[f"self_check.output.{index}"] = np.ascontiguousarray(output)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": 1 if spec.interface is None else FORMAT_VERSION,
        "dtype": "float32",
        "input_features": spec.input_features,
        "source": dict(spec.source),
        "layers": [{"kind": layer.kind, "name": layer.name, "config": layer.config} for layer in spec.layers],
        "transforms": spec.transforms,
        "self_check": has_check,
    }
    if spec.interface is not None:
        manifest["interface"] = spec.interface
    return save(tensors, metadata={METADATA_KEY: json.dumps(manifest)})


def save(spec: ModelSpec, path) -> Path:
    """Write a bundle atomically: the file under ``path`` is the old one or the complete new one."""
    return atomic_write_bytes(path, to_bytes(spec))


def _parse_header(buffer, path) -> tuple[dict, dict, int]:
    size = len(buffer)
    if size < 8:
        raise BundleError(f"{path}: {size} bytes is too short for a bundle; re-export it with gru-engine export")
    (header_length,) = struct.unpack("<Q", buffer[:8])
    if not 2 <= header_length <= min(MAX_HEADER_BYTES, size - 8):
        raise BundleError(f"{path}: not a gru-engine bundle (header length {header_length} does not fit a "
                          f"{size}-byte file); the file is truncated or of another type")
    try:
        header = json.loads(bytes(buffer[8:8 + header_length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: the header is not valid JSON ({str(exc)[:80]}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: the header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise BundleError(f"{path}: no '{METADATA_KEY}' manifest in the metadata; this safetensors file was "
                          "not written by gru-engine (export the model with: gru-engine export MODEL --bundle OUT)")
    return header, metadata, 8 + header_length


def _map_tensors(header: dict, buffer, data_start: int, path) -> dict[str, np.ndarray]:
    data_size = len(buffer) - data_start
    tensors, ranges = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BundleError(f"{path}: tensor '{name}' has a malformed header entry")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if entry["dtype"] != "F32":
            raise BundleError(f"{path}: tensor '{name}' has dtype {entry['dtype']!r}; bundles hold float32 (F32)")
        if not isinstance(shape, list) or len(shape) > 4 or not all(
                type(d) is int and 0 <= d <= 1 << 40 for d in shape):
            raise BundleError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise BundleError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if not 0 <= begin <= end <= data_size or end - begin != 4 * count:
            raise BundleError(f"{path}: tensor '{name}' claims bytes [{begin}, {end}) for shape {shape}, but the "
                              f"data section has {data_size} bytes; the file is truncated or corrupt")
        ranges.append((begin, end, name))
        tensors[name] = np.frombuffer(buffer, dtype="<f4", count=count, offset=data_start + begin).reshape(shape)
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise BundleError(f"{path}: tensor '{name}' overlaps another or leaves a gap; the file is corrupt")
        position = end
    if position != data_size:
        raise BundleError(f"{path}: {data_size - position} bytes after the last tensor; the file is corrupt")
    return tensors


def _manifest(metadata: dict, path) -> dict:
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        raise BundleError(f"{path}: the manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: manifest format is not '{FORMAT_NAME}'")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        newer = type(version) is int and version > max(READABLE_VERSIONS)
        raise BundleError(f"{path}: bundle format_version {version!r}; this gru-engine reads versions "
                          f"{list(READABLE_VERSIONS)}. " + ("Upgrade gru-engine to read it" if newer else
                                                            "Re-export the model with this version's gru-engine"))
    if set(manifest) != VERSION_KEYS[version]:
        raise BundleError(f"{path}: manifest fields {sorted(manifest)}; format version {version} has exactly "
                          f"{sorted(VERSION_KEYS[version])}")
    if manifest["dtype"] != "float32":
        raise BundleError(f"{path}: manifest dtype {manifest['dtype']!r}; only float32 is supported")
    if not isinstance(manifest["layers"], list) or not isinstance(manifest["source"], dict) \
            or not isinstance(manifest["self_check"], bool):
        raise BundleError(f"{path}: manifest 'layers' must be a list, 'source' an object, 'self_check' a bool")
    return manifest


def from_buffer(buffer, path="<bundle>") -> ModelSpec:
    """Parse and validate a bundle held in ``buffer`` (bytes or an mmap); arrays are views into it."""
    header, metadata, data_start = _parse_header(buffer, path)
    manifest = _manifest(metadata, path)
    tensors = _map_tensors(header, buffer, data_start, path)
    layers = []
    for index, entry in enumerate(manifest["layers"]):
        if not isinstance(entry, dict) or set(entry) != {"kind", "name", "config"}:
            raise BundleError(f"{path}: manifest layer {index} must have exactly kind, name, config")
        prefix = f"layers.{index}."
        weights = {name[len(prefix):]: tensors.pop(name) for name in list(tensors) if name.startswith(prefix)}
        layers.append(Layer(entry["kind"], entry["name"], entry["config"], weights))
    check_input = tensors.pop("self_check.input", None)
    check_outputs = []
    while f"self_check.output.{len(check_outputs)}" in tensors:
        check_outputs.append(tensors.pop(f"self_check.output.{len(check_outputs)}"))
    if tensors:
        raise BundleError(f"{path}: unexpected tensors {sorted(tensors)[:5]}; the manifest does not account for them")
    if manifest["self_check"] != (check_input is not None):
        raise BundleError(f"{path}: manifest self_check={manifest['self_check']} disagrees with the tensors present")
    spec = ModelSpec(manifest["input_features"], layers, manifest["source"], manifest["transforms"],
                     check_input, check_outputs, manifest.get("interface"))
    if manifest["format_version"] == 2 and spec.interface is None:
        raise BundleError(f"{path}: a format version 2 manifest needs an interface object")
    try:
        validate(spec)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    return spec


def read(path) -> ModelSpec:
    """Memory-map and validate a bundle file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                raise BundleError(f"{path}: the file is empty")
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BundleError(f"{path}: is a directory, not a bundle file") from None
    return from_buffer(buffer, path)


def self_check(model, path="<bundle>") -> float:
    """Replay the stored self-check input; raise BundleError if the outputs disagree."""
    spec = model.spec
    if spec.self_check_input is None:
        raise BundleError(f"{path}: the bundle has no self-check; load it with verify=False to run it anyway")
    initial_state, lengths = None, None
    if spec.interface is not None:  # a graph's constant initial_h and sequence_lens are part of its function
        from .interface import constants

        states, lengths = constants(spec.interface)
        if any(state is not None for state in states):
            initial_state = [np.zeros((spec.self_check_input.shape[0], units), np.float32) if state is None
                             else state for state, units in zip(states, model.state_shapes)]
    outputs = model.predict_raw(spec.self_check_input, initial_state, lengths)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    worst = max(max_excess(actual, expected) for actual, expected in zip(outputs, spec.self_check_outputs))
    if worst > 0:
        raise BundleError(f"{path}: self-check failed: the engine's output differs from the stored "
                          f"{spec.source.get('framework', 'source')} output by {worst:.3g} beyond tolerance; "
                          "the weights or configuration do not match the model that was exported")
    return worst

