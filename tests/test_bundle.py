"""The bundle file: round trip, every kind of bad file refused with a BundleError naming what is wrong,
atomic writes, memory-mapped weights.

Bundles here come from ``reference.random_spec`` (random weights, self-check from the float64
reference), so these tests need no TensorFlow; tests/test_parity.py covers bundles exported from Keras.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tracemalloc

import numpy as np
import pytest

import gru_engine
from gru_engine import BundleError, bundle, fileio
from gru_engine.spec import Layer, max_excess
from reference import gru_config, random_spec, recurrent_config, reference_predict

SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16",
                      np.dtype("int32"): "I32"}


# --- reading and writing bundle bytes by hand, so tests can make any file they need ---

def unpack(data: bytes) -> tuple[dict, dict, bytes]:
    """bundle bytes -> (tensor header entries, manifest, data section)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    manifest = json.loads(header.pop("__metadata__")[bundle.METADATA_KEY])
    return header, manifest, data[8 + length:]


def pack(header: dict, manifest, payload: bytes) -> bytes:
    """The inverse of ``unpack``; ``manifest`` may be a dict or the manifest's raw string."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    raw = json.dumps({"__metadata__": {bundle.METADATA_KEY: text}, **header}).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def tensors_of(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """bundle bytes -> (name -> array copy, manifest)."""
    header, manifest, payload = unpack(data)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(payload[begin:end], "<f4").reshape(entry["shape"]).copy()
    return tensors, manifest


def pack_tensors(tensors: dict[str, np.ndarray], manifest) -> bytes:
    """A well-formed file holding exactly ``tensors`` (any dtype safetensors names) and ``manifest``."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return pack(header, manifest, b"".join(chunks))


def small_spec(seed: int = 0):
    """GRU(5, sequences) -> Dense(2) on 3 features: small, but every kind of tensor."""
    layers = [Layer("gru", "gru", gru_config(5, return_sequences=True)),
              Layer("dense", "dense", {"units": 2, "activation": "tanh", "use_bias": True})]
    return random_spec(layers, 3, seed=seed)


@pytest.fixture(scope="module")
def valid_bytes() -> bytes:
    return bundle.to_bytes(small_spec())


def write(tmp_path, data: bytes, name: str = "model.gru.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(tmp_path, data: bytes, *, match: str):
    """Loading ``data`` raises a BundleError whose message matches ``match`` and names the file."""
    path = write(tmp_path, data)
    with pytest.raises(BundleError, match=match) as caught:
        gru_engine.load(path)
    assert str(path) in str(caught.value)
    return caught.value


# --- round trip ---

def test_round_trip_keeps_everything(tmp_path):
    spec = small_spec()
    path = bundle.save(spec, tmp_path / "model.gru.safetensors")
    loaded = gru_engine.load(path).spec
    assert loaded.input_features == spec.input_features and loaded.source == spec.source
    for before, after in zip(spec.layers, loaded.layers):
        assert (after.kind, after.name, after.config) == (before.kind, before.name, before.config)
        assert set(after.weights) == set(before.weights)
        for name in before.weights:
            np.testing.assert_array_equal(after.weights[name], before.weights[name])
    np.testing.assert_array_equal(loaded.self_check_input, spec.self_check_input)
    x = np.random.default_rng(5).standard_normal((3, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(gru_engine.load(path).predict(x), reference_predict(spec, x)[0], rtol=1e-4, atol=1e-5)


def test_weights_are_read_only_views_of_a_memory_map(tmp_path):
    path = bundle.save(small_spec(), tmp_path / "model.gru.safetensors")
    spec = bundle.read(path)
    kernel = spec.layers[0].weights["kernel"]
    assert not kernel.flags.owndata and not kernel.flags.writeable
    base = kernel
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, mmap.mmap), f"the kernel's memory belongs to {type(base).__name__}, not a memory map"
    assert np.shares_memory(kernel, np.frombuffer(base, np.uint8))
    with pytest.raises(ValueError):
        kernel[0, 0] = 1.0


# --- the manifest ---

@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5, 1.0, True, [1]])
def test_wrong_format_version(tmp_path, valid_bytes, version):
    header, manifest, payload = unpack(valid_bytes)
    refused(tmp_path, pack(header, dict(manifest, format_version=version), payload), match="format_version")


@pytest.mark.parametrize("name", ["gru-engine-bundle-2", "", None, 7])
def test_wrong_format_name(tmp_path, valid_bytes, name):
    header, manifest, payload = unpack(valid_bytes)
    refused(tmp_path, pack(header, dict(manifest, format=name), payload), match="format")


def test_manifest_fields_missing_or_unknown(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    refused(tmp_path, pack(header, dict(manifest, comment="hi"), payload), match="manifest fields")
    del manifest["transforms"]
    refused(tmp_path, pack(header, manifest, payload), match="manifest fields")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"format": "gru-engine-bundle"', "[" * 100000])
def test_manifest_that_is_not_a_json_object(tmp_path, valid_bytes, text):
    header, _, payload = unpack(valid_bytes)
    refused(tmp_path, pack(header, text, payload), match="manifest")


def test_layer_config_errors_name_the_field(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    broken = json.loads(json.dumps(manifest))
    broken["layers"][0]["config"]["activation"] = "softmax"
    refused(tmp_path, pack(header, broken, payload), match="'activation' is 'softmax'")
    broken = json.loads(json.dumps(manifest))
    broken["layers"][0]["config"]["reset_after"] = 1
    refused(tmp_path, pack(header, broken, payload), match="'reset_after' must be bool")
    broken = json.loads(json.dumps(manifest))
    del broken["layers"][1]["config"]["use_bias"]
    refused(tmp_path, pack(header, broken, payload), match="use_bias")


@pytest.mark.parametrize("where", ["layer", "bidirectional"])
def test_a_kind_this_version_does_not_know_asks_to_upgrade(tmp_path, where):
    """A bundle from a newer gru-engine (a layer kind, or a kind wrapped by Bidirectional, that this
    reader does not know) is refused with a message saying to upgrade, never read as something else."""
    spec = random_spec([Layer("bidirectional", "bi", {"merge_mode": "sum", "layer": "lstm",
                                                      "forward": recurrent_config("lstm", 3),
                                                      "backward": recurrent_config("lstm", 3, go_backwards=True)}),
                        Layer("dense", "dense", {"units": 2, "activation": "tanh", "use_bias": True})], 2)
    header, manifest, payload = unpack(bundle.to_bytes(spec))
    if where == "layer":
        manifest["layers"][1]["kind"] = "state_space_block"
        match = r"layer 1: unknown layer kind 'state_space_block'.*upgrade gru-engine"
    else:
        manifest["layers"][0]["config"]["layer"] = "state_space_block"
        match = r"layer 0: unknown layer kind 'state_space_block'.*upgrade gru-engine"
    refused(tmp_path, pack(header, manifest, payload), match=match)


FAMILY_LAYERS = {
    "lstm": [Layer("lstm", "lstm", recurrent_config("lstm", 5, return_sequences=True, recurrent_activation="hard_sigmoid")),
             Layer("lstm", "last", recurrent_config("lstm", 3, use_bias=False, return_state=True))],
    "simple_rnn": [Layer("simple_rnn", "rnn", recurrent_config("simple_rnn", 4, activation="relu", go_backwards=True))],
    "bidirectional-lstm": [Layer("bidirectional", "bi", {
        "merge_mode": None, "layer": "lstm", "forward": recurrent_config("lstm", 3, return_state=True),
        "backward": recurrent_config("lstm", 2, return_state=True, go_backwards=True)})],
}


@pytest.mark.parametrize("name", sorted(FAMILY_LAYERS))
def test_lstm_and_simple_rnn_bundles_round_trip(tmp_path, name):
    spec = random_spec(FAMILY_LAYERS[name], 3, seed=2)
    model = gru_engine.load(bundle.save(spec, tmp_path / "model.gru.safetensors"))  # replays the self-check
    assert [(layer.kind, layer.config) for layer in model.spec.layers] == \
        [(layer.kind, layer.config) for layer in spec.layers]
    x = np.random.default_rng(3).standard_normal((3, 6, 3)).astype(np.float32)
    expected = reference_predict(spec, x)
    actual = model.predict(x)
    actual = actual if isinstance(actual, list) else [actual]
    assert [a.shape for a in actual] == [e.shape for e in expected]
    assert all(max_excess(a, e) <= 0 for a, e in zip(actual, expected))


def test_family_configs_and_shapes_are_checked(tmp_path):
    header, manifest, payload = unpack(bundle.to_bytes(random_spec(FAMILY_LAYERS["lstm"], 3)))
    broken = json.loads(json.dumps(manifest))
    broken["layers"][0]["config"]["reset_after"] = True  # a GRU-only field
    refused(tmp_path, pack(header, broken, payload), match=r"unknown fields \['reset_after'\]")
    broken = json.loads(json.dumps(manifest))
    broken["layers"][0]["kind"] = "gru"  # LSTM tensors under a GRU: (3, 20) where a GRU has (3, 15)
    refused(tmp_path, pack(header, broken, payload), match=r"missing fields \[.reset_after.\]")
    broken = json.loads(json.dumps(manifest))
    broken["layers"][1]["kind"] = "simple_rnn"
    del broken["layers"][1]["config"]["recurrent_activation"]
    refused(tmp_path, pack(header, broken, payload), match=r"tensor 'kernel' has shape \(5, 12\).*implies \(5, 3\)")


@pytest.mark.parametrize("kind", [["affine"], {"kind": "log"}])
def test_transform_kind_that_is_not_a_string(tmp_path, kind):
    spec = small_spec()
    spec.transforms = [{"kind": "log", "invert_output": False}]
    header, manifest, payload = unpack(bundle.to_bytes(spec))
    manifest["transforms"][0]["kind"] = kind
    refused(tmp_path, pack(header, manifest, payload), match="transform 0")


@pytest.mark.parametrize("number", [10**400, -10**400, 1e300, 3.5e38])
def test_numbers_beyond_float32_are_refused(tmp_path, number):
    """JSON integers of any size parse in Python; float32 is the engine's range."""
    spec = small_spec()
    spec.layers.insert(0, Layer("masking", "masking", {"mask_value": 0.0}))
    spec.transforms = [{"kind": "affine", "scale": [1.0] * 3, "offset": [0.0] * 3,
                        "output_scale": None, "output_offset": None}]
    header, manifest, payload = unpack(bundle.to_bytes(random_spec(spec.layers, 3, transforms=spec.transforms)))
    masked = json.loads(json.dumps(manifest))
    masked["layers"][0]["config"]["mask_value"] = number
    refused(tmp_path, pack(header, masked, payload), match="mask_value")
    scaled = json.loads(json.dumps(manifest))
    scaled["transforms"][0]["offset"][1] = number
    refused(tmp_path, pack(header, scaled, payload), match="offset")


def test_output_transform_on_a_two_output_bidirectional_is_checked_against_one_direction(tmp_path):
    """merge_mode=None returns each direction apart: a transform undone on the output must fit one."""
    bidirectional = {"merge_mode": None, "forward": gru_config(2, return_sequences=True),
                     "backward": gru_config(2, return_sequences=True, go_backwards=True)}
    layers = [Layer("bidirectional", "bidirectional", bidirectional)]
    affine = {"kind": "affine", "scale": [1.0], "offset": [0.0], "output_scale": [2.0, 2.0, 2.0, 2.0],
              "output_offset": [0.0] * 4}
    with pytest.raises(BundleError, match="output_scale"):
        gru_engine.Model(random_spec(layers, 1, transforms=[affine]))
    fitting = dict(affine, output_scale=[2.0, 2.0], output_offset=[1.0, 1.0])
    model = gru_engine.Model(random_spec(layers, 1, transforms=[fitting]))
    forward, backward = model.predict(np.ones((1, 3, 1), np.float32))
    raw_forward, raw_backward = model.predict_raw(np.ones((1, 3, 1), np.float32))
    np.testing.assert_allclose(forward, (raw_forward - 1.0) / 2.0, rtol=1e-6)


def peak_memory_of_refusal(path, *, match: str) -> int:
    """Bytes allocated at the peak while load(path) raises a BundleError matching ``match``."""
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=match):
            gru_engine.load(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("units", [10**9, 2**62, 0, -5])
def test_absurd_unit_counts_are_refused_before_any_allocation(tmp_path, valid_bytes, units):
    header, manifest, payload = unpack(valid_bytes)
    manifest["layers"][0]["config"]["units"] = units
    peak = peak_memory_of_refusal(write(tmp_path, pack(header, manifest, payload)), match="'units' is")
    assert peak < 10 << 20, f"refusing the bundle took {peak >> 20} MiB"


def test_a_tensor_claiming_terabytes_is_refused_before_any_allocation(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    header["layers.0.kernel"]["shape"] = [10**12, 15]
    peak = peak_memory_of_refusal(write(tmp_path, pack(header, manifest, payload)), match="layers.0.kernel")
    assert peak < 10 << 20, f"refusing the bundle took {peak >> 20} MiB"


# --- tensors ---

def test_missing_tensor(tmp_path, valid_bytes):
    tensors, manifest = tensors_of(valid_bytes)
    del tensors["layers.0.recurrent_kernel"]
    refused(tmp_path, pack_tensors(tensors, manifest), match=r"missing tensors \['recurrent_kernel'\]")


def test_extra_tensor(tmp_path, valid_bytes):
    tensors, manifest = tensors_of(valid_bytes)
    refused(tmp_path, pack_tensors(dict(tensors, **{"layers.1.gamma": np.ones(2, np.float32)}), manifest),
            match=r"unexpected tensors \['gamma'\]")
    refused(tmp_path, pack_tensors(dict(tensors, stowaway=np.ones(2, np.float32)), manifest),
            match="stowaway")


def test_missing_self_check_output(tmp_path, valid_bytes):
    tensors, manifest = tensors_of(valid_bytes)
    del tensors["self_check.output.0"]
    refused(tmp_path, pack_tensors(tensors, manifest), match="self-check outputs")


def test_wrong_shape_consistent_with_its_bytes(tmp_path, valid_bytes):
    tensors, manifest = tensors_of(valid_bytes)
    tensors["layers.0.kernel"] = np.zeros((4, 15), np.float32)
    refused(tmp_path, pack_tensors(tensors, manifest), match=r"'kernel' has shape \(4, 15\)")


def test_wrong_shape_inconsistent_with_its_bytes(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    header["layers.1.bias"]["shape"] = [3]
    refused(tmp_path, pack(header, manifest, payload), match="layers.1.bias")


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_wrong_dtype(tmp_path, valid_bytes, dtype):
    tensors, manifest = tensors_of(valid_bytes)
    tensors["layers.1.kernel"] = tensors["layers.1.kernel"].astype(dtype)
    refused(tmp_path, pack_tensors(tensors, manifest), match=r"'layers.1.kernel' has dtype")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", ["layers.0.bias", "layers.1.kernel", "self_check.input", "self_check.output.0"])
def test_non_finite_values(tmp_path, valid_bytes, tensor, value):
    tensors, manifest = tensors_of(valid_bytes)
    tensors[tensor].flat[3] = value
    refused(tmp_path, pack_tensors(tensors, manifest), match="NaN or infinite")


def test_overlapping_tensors(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    start = header["layers.0.bias"]["data_offsets"][0]
    header["layers.1.bias"]["data_offsets"] = [start, start + 8]  # its 2 floats, inside layer 0's bias
    refused(tmp_path, pack(header, manifest, payload), match="overlaps another or leaves a gap")


def test_trailing_bytes(tmp_path, valid_bytes):
    refused(tmp_path, valid_bytes + b"\0" * 8, match="after the last tensor")


# --- files that are cut short or are not bundles ---

def test_truncated_at_every_region(tmp_path, valid_bytes):
    (header_length,) = struct.unpack("<Q", valid_bytes[:8])
    data_start = 8 + header_length
    cuts = {1, 7, 8, 9, data_start // 2, data_start - 1, data_start, data_start + 1, data_start + 4,
            (data_start + len(valid_bytes)) // 2, len(valid_bytes) - 4, len(valid_bytes) - 1}
    for cut in sorted(cuts):
        error = refused(tmp_path, valid_bytes[:cut], match="bundle|truncated|corrupt|too short")
        assert str(error).count("\n") == 0


def test_empty_file(tmp_path):
    refused(tmp_path, b"", match="empty")


def test_random_bytes(tmp_path):
    for seed in range(5):
        data = np.random.default_rng(seed).bytes(4096)
        refused(tmp_path, data, match="not a gru-engine bundle|not valid JSON|header")


def test_a_plain_safetensors_file_without_a_manifest(tmp_path):
    from safetensors.numpy import save

    refused(tmp_path, save({"weight": np.ones((2, 2), np.float32)}), match="no 'gru_engine' manifest")


def test_json_that_is_not_an_object(tmp_path):
    raw = b"[1, 2, 3]"
    refused(tmp_path, struct.pack("<Q", len(raw)) + raw, match="JSON object")


def test_a_directory_and_a_missing_file(tmp_path):
    with pytest.raises(BundleError, match="directory"):
        gru_engine.load(tmp_path)
    with pytest.raises(BundleError, match="no such file"):
        gru_engine.load(tmp_path / "absent.gru.safetensors")


# --- the self-check ---

def test_tampered_weights_fail_the_self_check(tmp_path, valid_bytes):
    tensors, manifest = tensors_of(valid_bytes)
    tensors["layers.0.recurrent_kernel"][0, 0] += 0.5
    path = write(tmp_path, pack_tensors(tensors, manifest))
    with pytest.raises(BundleError, match="self-check failed"):
        gru_engine.load(path)
    model = gru_engine.load(path, verify=False)  # the user's explicit choice to run it anyway
    x = model.spec.self_check_input
    assert model.predict(x).shape == (2, 5, 2)


def test_weights_that_overflow_to_nan_fail_the_self_check(tmp_path):
    layers = [Layer("gru", "gru", gru_config(2, activation="linear")),
              Layer("dense", "difference", {"units": 1, "activation": "linear", "use_bias": True})]
    tensors, manifest = tensors_of(bundle.to_bytes(random_spec(layers, 1)))
    tensors["layers.0.kernel"][0, 4:] = 3e38            # the candidate hh of both units overflows to +inf
    tensors["layers.0.recurrent_kernel"][:, 4:] = 3e38
    tensors["layers.1.kernel"][:] = [[1.0], [-1.0]]     # inf - inf = NaN
    path = write(tmp_path, pack_tensors(tensors, manifest))
    assert np.isnan(gru_engine.load(path, verify=False).predict(tensors["self_check.input"])).all()
    with pytest.raises(BundleError, match="self-check failed"):
        gru_engine.load(path)


def test_a_bundle_without_self_check_needs_verify_false(tmp_path):
    spec = small_spec()
    spec.self_check_input, spec.self_check_outputs = None, []
    path = bundle.save(spec, tmp_path / "model.gru.safetensors")
    with pytest.raises(BundleError, match="no self-check"):
        gru_engine.load(path)
    assert gru_engine.load(path, verify=False).predict(np.ones((1, 2, 3))).shape == (1, 2, 2)


def test_manifest_self_check_flag_must_match_the_tensors(tmp_path, valid_bytes):
    header, manifest, payload = unpack(valid_bytes)
    refused(tmp_path, pack(header, dict(manifest, self_check=False), payload), match="self_check")


# --- atomic writes ---

def _fail(*args, **kwargs):
    raise OSError("injected failure")


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_a_failed_save_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, where):
    path = bundle.save(small_spec(seed=1), tmp_path / "model.gru.safetensors")
    before = path.read_bytes()
    if where == "write":
        real_open = open

        def failing_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if "w" in mode and str(file).endswith(".tmp"):
                handle.write(b"partial")
                handle.close()
                raise OSError("injected failure")
            return handle
        monkeypatch.setattr("builtins.open", failing_open)
    else:
        monkeypatch.setattr(fileio.os, where, _fail)
    with pytest.raises(OSError, match="injected failure"):
        bundle.save(small_spec(seed=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]
    gru_engine.load(path)


def test_an_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(fileio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bundle.save(small_spec(), tmp_path / "model.gru.safetensors")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_save_replaces_a_bundle_that_is_memory_mapped(tmp_path):
    """Overwriting a bundle a live model maps must not change what that model computes."""
    path = bundle.save(small_spec(seed=1), tmp_path / "model.gru.safetensors")
    old = gru_engine.load(path)
    x = old.spec.self_check_input
    expected = old.predict(x)
    bundle.save(small_spec(seed=2), path)
    np.testing.assert_array_equal(old.predict(x), expected)
    np.testing.assert_array_equal(old.spec.layers[0].weights["kernel"], small_spec(seed=1).layers[0].weights["kernel"])
    assert not np.array_equal(gru_engine.load(path).predict(x), expected)
