"""Fuzzing: mutated bundles and hostile inputs must be refused cleanly, never crash.

Every mutated bundle either loads (and so passes its self-check, then runs) or raises BundleError;
every hostile input either gives a float32 answer or raises InputError. Anything else is a failure.
The cases run in a child process (this file run as a script), so a segfault or abort is a failure
the parent reports, naming the case that was running, instead of killing the test session.

Budget: GRU_ENGINE_FUZZ_EXAMPLES mutated bundles (default 2000) and half as many hostile inputs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = int(os.environ.get("GRU_ENGINE_FUZZ_EXAMPLES", "2000"))
CHILD_MEMORY_LIMIT = 3 << 30  # a runaway allocation is a MemoryError (a failure), not the OOM killer


# --------------------------------------------------------------------------------------------------
# The parent: pytest tests that run the child and judge its report.

def run_child(mode: str, examples: int, tmp_path: Path) -> dict:
    progress = tmp_path / f"{mode}.progress"
    result = subprocess.run([sys.executable, __file__, mode, str(examples), str(tmp_path), str(progress)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        last = progress.read_text().splitlines()[-1:] if progress.exists() else ["(none)"]
        pytest.fail(f"the fuzz child died with exit status {result.returncode} while running case: {last[0]}\n"
                    f"{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def show(capsys, title: str, report: dict) -> None:
    counts = {key: value for key, value in report.items() if key != "unexpected"}
    with capsys.disabled():
        print(f"\n{title}: {json.dumps(counts)}")


def test_mutated_bundles_load_or_raise_bundle_error(tmp_path, capsys):
    report = run_child("bundles", EXAMPLES, tmp_path)
    show(capsys, "bundle fuzz", report)
    assert report["unexpected"] == [], "\n\n".join(report["unexpected"][:5])
    assert report["cases"] >= EXAMPLES
    assert report["cases"] == report["refused"] + report["loaded_verified"]
    # Both outcomes must occur, or the mutations are not exercising the loader.
    assert report["refused"] > 0 and report["loaded_verified"] > 0


def test_hostile_inputs_give_answers_or_input_errors(tmp_path, capsys):
    report = run_child("inputs", EXAMPLES // 2, tmp_path)
    show(capsys, "input fuzz", report)
    assert report["unexpected"] == [], "\n\n".join(report["unexpected"][:5])
    assert report["cases"] >= EXAMPLES // 2
    assert report["cases"] == report["refused"] + report["answered"]
    assert report["refused"] > 0 and report["answered"] > 0


# --------------------------------------------------------------------------------------------------
# The child: builds seed bundles from the reference, then mutates them with hypothesis.

def seed_specs():
    """Small valid specs covering every layer kind, option and transform the manifest can hold."""
    from gru_engine.spec import Layer
    from reference import gru_config, random_spec, recurrent_config

    backward = gru_config(3, go_backwards=True)
    dense = {"units": 2, "activation": "softmax", "use_bias": True}
    return [
        random_spec([Layer("gru", "gru", gru_config(5, return_sequences=True)),
                     Layer("dense", "dense", {"units": 2, "activation": "tanh", "use_bias": True})], 3, seed=1),
        random_spec([Layer("masking", "mask", {"mask_value": 0.0}),
                     Layer("bidirectional", "bi", {"merge_mode": "concat",
                                                   "forward": gru_config(3, return_sequences=True),
                                                   "backward": dict(backward, return_sequences=True)}),
                     Layer("gru", "last", gru_config(2, reset_after=False, use_bias=False, return_state=True))],
                    2, seed=2),
        random_spec([Layer("bidirectional", "bi", {"merge_mode": None, "forward": gru_config(3),
                                                   "backward": backward})], 1, seed=3),
        random_spec([Layer("gru", "gru", gru_config(4, activation="relu", recurrent_activation="hard_sigmoid",
                                                    go_backwards=True, return_sequences=True)),
                     Layer("dense", "dense", dense)], 2, seed=4,
                    transforms=[{"kind": "log", "invert_output": False},
                                {"kind": "affine", "scale": [2.0, 0.5], "offset": [0.0, 1.0],
                                 "output_scale": None, "output_offset": None}]),
        random_spec([Layer("gru", "gru", gru_config(3))], 2, seed=5,
                    transforms=[{"kind": "center", "invert_output": True, "output_features": [0, 1, 1]}]),
        imported_spec(),
        random_spec([Layer("conv1d", "conv", {"filters": 4, "kernel_size": 3, "strides": 2, "padding": "valid",
                                              "dilation_rate": 1, "groups": 2, "activation": "relu", "use_bias": True}),
                     Layer("batch_normalization", "norm", {"epsilon": 1e-3, "center": True, "scale": False}),
                     Layer("max_pooling1d", "pool", {"pool_size": 2, "strides": 1, "padding": "same"}),
                     Layer("gru", "gru", gru_config(3, return_sequences=True)),
                     Layer("global_average_pooling1d", "mean", {})], 2, seed=9, check_shape=(2, 9)),
        random_spec([Layer("conv1d", "causal", {"filters": 3, "kernel_size": 2, "strides": 1, "padding": "causal",
                                                "dilation_rate": 2, "groups": 1, "activation": "linear",
                                                "use_bias": False}),
                     Layer("batch_normalization", "norm", {"epsilon": 1e-3, "center": False, "scale": True}),
                     Layer("gru", "gru", gru_config(3)),
                     Layer("dense", "dense", {"units": 2, "activation": "linear", "use_bias": True})], 1, seed=10),
        random_spec([Layer("masking", "mask", {"mask_value": 0.0}),
                     Layer("lstm", "lstm", recurrent_config("lstm", 4, return_sequences=True,
                                                            recurrent_activation="hard_sigmoid")),
                     Layer("simple_rnn", "rnn", recurrent_config("simple_rnn", 3, return_state=True))], 2, seed=6),
        random_spec([Layer("bidirectional", "bi", {"merge_mode": "ave", "layer": "lstm",
                                                   "forward": recurrent_config("lstm", 3, return_sequences=True),
                                                   "backward": recurrent_config("lstm", 3, return_sequences=True,
                                                                                go_backwards=True)}),
                     Layer("lstm", "last", recurrent_config("lstm", 2, use_bias=False, return_state=True))], 2, seed=7),
        random_spec([Layer("bidirectional", "bi", {"merge_mode": None, "layer": "simple_rnn",
                                                   "forward": recurrent_config("simple_rnn", 3, activation="relu"),
                                                   "backward": recurrent_config("simple_rnn", 2, go_backwards=True)})],
                    1, seed=8),
    ]


def imported_spec():
    """A bundle as import_onnx writes it: ONNX activations with parameters, clip, and the graph interface
    (time-major X, sequence_lens and initial_h inputs, Y and Y_h with a direction axis)."""
    from gru_engine.spec import Layer
    from reference import gru_config, random_spec

    onnx_options = dict(return_sequences=True, return_state=True, zero_output_for_mask=True, clip=3.0,
                        recurrent_activation="hard_sigmoid", recurrent_activation_alpha=0.2,
                        activation="scaled_tanh", activation_alpha=1.5, activation_beta=0.5)
    spec = random_spec([Layer("bidirectional", "gru", {
        "merge_mode": None, "forward": gru_config(3, **onnx_options),
        "backward": gru_config(3, go_backwards=True, **onnx_options)})], 2, seed=6)
    spec.interface = {
        "inputs": [{"name": "X", "role": "x", "axes": ["time", "batch", "features"], "shape": ["T", None, 2]},
                   {"name": "lens", "role": "lengths", "axes": ["batch"], "shape": ["B"]},
                   {"name": "h0", "role": "initial_h", "axes": ["direction", "batch", "features"],
                    "shape": [2, "B", 3]}],
        "outputs": [{"name": "Y", "parts": [0, 1], "axes": ["time", "direction", "batch", "features"],
                     "reverse_time": False, "shape": ["T", 2, "B", 3]},
                    {"name": "Y_h", "parts": [2, 3], "axes": ["direction", "batch", "features"],
                     "reverse_time": False, "shape": [2, "B", 3]}],
        "initial_state": [{"input": "h0", "index": 0}, {"input": "h0", "index": 1}],
        "lengths": {"input": "lens"}}
    return spec


# Values a JSON edit may put anywhere: wrong types, edge numbers, absurd sizes, deep nesting.
JSON_VALUES = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**9, 10**30, 10**400, -10**12, 0.5, -0.0, 1e300, 1e308, math.nan,
               math.inf,
               True, False, None, "", "F32", "F64", "I64", "tanh", "softmax", "gru", "lstm", "simple_rnn", "dense",
               "masking", "bidirectional", "concat", "conv1d", "valid", "same", "causal", "max_pooling1d",
               "global_max_pooling1d", "batch_normalization", "float64", "gru-engine-bundle", "x" * 500, [], {}, [0],
               [1, 1],
               [0, 0], [10**12], [2**62, 2**62], [-1, 4], [[[[[]]]]], {"units": 1}]


def split_bundle(data: bytes):
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    manifest = json.loads(header["__metadata__"]["gru_engine"])
    return header, manifest, data[8 + length:]


def join_bundle(header, manifest, payload: bytes) -> bytes:
    header = dict(header, __metadata__=dict(header.get("__metadata__", {}), gru_engine=json.dumps(manifest)))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def json_slots(value, path=()):
    """Every (path) into nested dicts and lists: the places an edit can land."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_slots(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_slots(item, path + (index,))


def mutate(data: bytes, draw, st) -> tuple[bytes, str]:
    """One random mutation of valid bundle bytes; returns the new bytes and a description."""
    header, manifest, payload = split_bundle(data)
    data_start = len(data) - len(payload)
    kind = draw(st.sampled_from(["bit_flips", "truncate", "json_edit", "json_edit", "json_edit", "swap_tensors",
                                 "poison_value", "header_length", "zero_dim", "absurd_tensor", "splice"]))
    if kind == "bit_flips":
        flipped = bytearray(data)
        region = draw(st.sampled_from(["anywhere", "header", "data"]))
        low, high = {"anywhere": (0, len(data)), "header": (0, data_start), "data": (data_start, len(data))}[region]
        positions = draw(st.lists(st.integers(low, high - 1), min_size=1, max_size=8))
        for position in positions:
            flipped[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(flipped), f"bit flips in {region} at {positions}"
    if kind == "truncate":
        region = draw(st.sampled_from(["length", "header", "data", "last bytes"]))
        low, high = {"length": (0, 8), "header": (8, data_start), "data": (data_start, len(data)),
                     "last bytes": (len(data) - 8, len(data))}[region]
        cut = draw(st.integers(low, high - 1))
        return data[:cut], f"truncated in {region} at {cut} of {len(data)}"
    if kind == "splice":
        position = draw(st.integers(0, len(data)))
        junk = draw(st.binary(min_size=1, max_size=16))
        return data[:position] + junk + data[position:], f"{len(junk)} bytes inserted at {position}"
    if kind == "header_length":
        length = draw(st.sampled_from([0, 1, 2, data_start - 9, data_start - 7, len(data), 2**32, 2**63, 2**64 - 1]))
        return struct.pack("<Q", max(length, 0)) + data[8:], f"header length field set to {length}"
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    names = sorted(tensors)
    if kind == "swap_tensors":
        first, second = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        what = draw(st.sampled_from(["entries", "offsets"]))
        if what == "entries":
            header[first], header[second] = header[second], header[first]
        else:
            header[first]["data_offsets"], header[second]["data_offsets"] = (
                header[second]["data_offsets"], header[first]["data_offsets"])
        return join_bundle(header, manifest, payload), f"swapped {what} of {first} and {second}"
    if kind == "poison_value":
        name = draw(st.sampled_from(names))
        begin, end = header[name]["data_offsets"]
        if end == begin:
            return data, "no-op: empty tensor"
        index = draw(st.integers(0, (end - begin) // 4 - 1))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, 0.0, 1e30]))
        poisoned = bytearray(payload)
        poisoned[begin + 4 * index:begin + 4 * index + 4] = struct.pack("<f", value)
        return join_bundle(header, manifest, bytes(poisoned)), f"{name}[{index}] = {value}"
    if kind == "zero_dim":
        name = draw(st.sampled_from(names))
        shape = header[name]["shape"]
        if shape:
            shape[draw(st.integers(0, len(shape) - 1))] = 0
        adjust = draw(st.booleans())
        if adjust:  # keep the byte range consistent with the new, empty shape
            begin = header[name]["data_offsets"][0]
            header[name]["data_offsets"] = [begin, begin]
        return join_bundle(header, manifest, payload), f"{name} shape {shape}, offsets adjusted={adjust}"
    if kind == "absurd_tensor":
        name = draw(st.sampled_from(names))
        shape = draw(st.sampled_from([[10**12], [2**31, 2**31], [2**40, 2**40, 2**40, 2**40], [2**62, 4], [-1]]))
        header[name]["shape"] = shape
        if draw(st.booleans()):
            begin = header[name]["data_offsets"][0]
            count = 1
            for size in shape:
                count *= size
            header[name]["data_offsets"] = [begin, begin + 4 * count]
        return join_bundle(header, manifest, payload), f"{name} shape {shape}"
    # json_edit: anywhere in the tensor entries or the manifest.
    document = {"tensors": tensors, "manifest": manifest}
    slots = [path for path in json_slots(document) if len(path) >= 2]
    path = draw(st.sampled_from(slots))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add_field", "wrap"]))
    if action == "replace":
        parent[key] = copy.deepcopy(draw(st.sampled_from(JSON_VALUES)))
    elif action == "delete":
        del parent[key]
    elif action == "add_field" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["extra", "units", "kind", "dtype", "__proto__"]))] = draw(
            st.sampled_from(JSON_VALUES))
    elif action == "add_field":
        parent.append(copy.deepcopy(parent[key]))
    else:
        parent[key] = [parent[key]]
    header = dict(document["tensors"], __metadata__=header["__metadata__"])
    return join_bundle(header, document["manifest"], payload), f"JSON {action} at {list(path)}"


class Tally:
    """Counts outcomes; records unexpected ones (with what caused them) instead of stopping."""

    def __init__(self, progress_path: str, *outcomes: str):
        self.counts = {"cases": 0, **{outcome: 0 for outcome in outcomes}}
        self.unexpected: list[str] = []
        self.progress = open(progress_path, "w", buffering=1)

    def start(self, description: str) -> None:
        self.counts["cases"] += 1
        self.progress.write(f"{self.counts['cases']}: {description[:300]}\n")

    def unexpected_error(self, description: str) -> None:
        self.counts["unexpected"] = self.counts.get("unexpected", 0) + 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"{description[:300]}\n{traceback.format_exc()[-1500:]}")

    def refused(self, description: str, error: Exception, must_name: str | None = None) -> None:
        """A clean refusal is one line (naming ``must_name`` when given); anything else is unexpected."""
        message = str(error).strip()
        if "\n" in message or (must_name is not None and must_name not in message):
            self.unexpected_error(f"{description}: refusal is not one line naming {must_name or 'the problem'}: "
                                  f"{error}")
        else:
            self.counts["refused"] += 1

    def report(self) -> str:
        return json.dumps({**self.counts, "unexpected": self.unexpected})


def check_loaded_model(model, rng) -> None:
    """A model that loaded must also run: predict, and stream where the model allows it."""
    from gru_engine import InputError
    from gru_engine.spec import output_shapes

    features = model.input_features
    x = (np.abs(rng.standard_normal((2, 4, features))) + 0.5).astype(np.float32)  # > 0 for log transforms
    try:
        outputs = model.predict(x)
    except InputError:
        return
    outputs = outputs if isinstance(outputs, list) else [outputs]
    expected = output_shapes(model.spec, model.shapes, 2, 4)
    assert [o.shape for o in outputs] == expected, ([o.shape for o in outputs], expected)
    if model.spec.interface is not None:
        check_session(model, rng)
    try:
        stream = model.stream(batch=2)
    except InputError:
        return  # bidirectional, backwards or windowed transforms: refused with a reason
    stream.step(x[:, 0])


def check_session(model, rng) -> None:
    """A bundle with a graph interface also answers through InferenceSession, as many outputs as it names."""
    from gru_engine import InferenceSession, InputError

    session = InferenceSession(model)
    sizes = {"batch": 2, "time": 4, "features": model.input_features}
    feeds = {}
    for entry in model.spec.interface["inputs"]:
        shape = [d if isinstance(d, int) else sizes.get(axis, 1) for d, axis in zip(entry["shape"], entry["axes"])]
        if entry["role"] == "lengths":
            feeds[entry["name"]] = rng.integers(1, 5, shape).astype(np.int32)
        else:
            feeds[entry["name"]] = rng.standard_normal(shape).astype(np.float32)
    try:
        outputs = session.run(None, feeds)
    except InputError:
        return
    assert len(outputs) == len(session.get_outputs())


def fuzz_bundles(examples: int, workdir: str, progress: str) -> str:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    import gru_engine
    from gru_engine import BundleError, bundle

    seeds = [bundle.to_bytes(spec) for spec in seed_specs()]
    for data in seeds:  # the starting points themselves must be valid
        path = Path(workdir) / "seed.gru.safetensors"
        path.write_bytes(data)
        gru_engine.load(path)
    tally = Tally(progress, "refused", "loaded_verified")
    path = Path(workdir) / "case.gru.safetensors"
    rng = np.random.default_rng(0)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        seed = data.draw(st.integers(0, len(seeds) - 1))
        mutated, description = mutate(seeds[seed], data.draw, st)
        description = f"seed {seed}: {description}"
        tally.start(description)
        path.write_bytes(mutated)
        try:
            model = gru_engine.load(path)
        except BundleError as error:
            tally.refused(description, error, must_name=str(path))
            return
        except Exception:
            tally.unexpected_error(description)
            return
        try:
            check_loaded_model(model, rng)
            tally.counts["loaded_verified"] += 1
        except Exception:
            tally.unexpected_error(f"{description}: loaded, then failed to run")

    case()
    return tally.report()


def hostile_arrays(st, well_formed_shape: tuple):
    """Arrays mostly numeric and of ``well_formed_shape`` (None: any size there), so values and layouts
    get exercised, not only the shape and dtype checks; the rest is anything."""
    from hypothesis.extra import numpy as hnp

    numeric = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.uint16, np.bool_, ">f4"])
    other = st.sampled_from([np.complex64, object, "U2", "S2", "datetime64[s]", [("a", "<f4")], ">i4"])
    dtypes = st.one_of(numeric, numeric, numeric, other)
    well_formed = st.tuples(*[st.integers(1, 8) if side is None else st.just(side) for side in well_formed_shape])
    sides = st.one_of(st.just(well_formed_shape[-1]), st.integers(0, 6))
    shapes = st.one_of(well_formed, well_formed, well_formed, st.lists(sides, min_size=0, max_size=4).map(tuple))

    @st.composite
    def arrays(draw):
        dtype = np.dtype(draw(dtypes))
        shape = draw(shapes)
        values = draw(st.sampled_from(["ordinary", "ordinary", "anything", "zeros"]))
        if dtype.kind == "f" and values == "ordinary":
            array = draw(hnp.arrays(dtype, shape, elements=st.floats(-8, 8, width=min(8 * dtype.itemsize, 64))))
        elif dtype.kind in "fiub" and values != "zeros":
            array = draw(hnp.arrays(dtype, shape))  # NaN, infinities, extremes, subnormals
        else:
            array = np.zeros(shape, dtype)
        layout = draw(st.sampled_from(["plain", "fortran", "reversed", "strided", "broadcast"]))
        if layout == "fortran":
            array = np.asfortranarray(array)
        elif layout == "reversed" and array.ndim:
            array = array[::-1]
        elif layout == "strided" and array.ndim:
            array = np.repeat(array, 2, axis=0)[::2]
        elif layout == "broadcast" and array.ndim >= 2 and array.shape[0] == 1:
            array = np.broadcast_to(array, (draw(st.integers(1, 5)),) + array.shape[1:])
        return array
    return arrays()


def fuzz_inputs(examples: int, workdir: str, progress: str) -> str:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from gru_engine import InputError, Model
    from gru_engine.fileio import read_array
    from gru_engine.spec import output_shapes

    models = [Model(spec) for spec in seed_specs()]
    streamable = []
    for model in models:
        try:
            model.stream()
            streamable.append(model)
        except InputError:
            pass
    tally = Tally(progress, "refused", "answered")
    workdir = Path(workdir)

    def file_contents(draw):
        kind = draw(st.sampled_from(["npy", "npy", "csv", "csv", "other"]))
        if kind == "npy":
            import io
            buffer = io.BytesIO()
            array = draw(hostile_arrays(st, (None, None, draw(st.integers(1, 3)))))
            if array.dtype.kind in "OV" or array.dtype.hasobject:
                np.save(buffer, array, allow_pickle=True)
            else:
                np.save(buffer, array)
            raw = bytearray(buffer.getvalue())
            edit = draw(st.sampled_from(["none", "flip", "truncate", "shape"]))
            if edit == "flip" and raw:
                for position in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
                    raw[position] ^= 0xFF
            elif edit == "truncate":
                raw = raw[:draw(st.integers(0, len(raw)))]
            elif edit == "shape":
                text = raw.decode("latin-1")
                start, stop = text.find("'shape': ("), text.find(")", text.find("'shape': ("))
                if start >= 0:
                    new = draw(st.sampled_from(["(10000000000000,)", "(2147483647, 2147483647)", "(-1,)",
                                                "(0, 0, 0)", "(1, 1, 1, 1, 1)"]))
                    text = text[:start] + "'shape': " + new + text[stop + 1:]
                    raw = bytearray(text.encode("latin-1"))
            return ".npy", bytes(raw)
        if kind == "csv":
            alphabet = st.sampled_from(list("0123456789.,-+e\n \t") + ["nan", "inf", "x", "1e999", "\r\n", '"'])
            return ".csv", "".join(draw(st.lists(alphabet, max_size=60))).encode()
        return draw(st.sampled_from([".txt", ".NPY", "", ".csv.gz"])), draw(st.binary(max_size=64))

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        draw = data.draw
        target = draw(st.sampled_from(["predict", "predict", "initial_state", "step", "run", "file", "file"]))
        # Mostly models that can stream, for the stream targets; the others must refuse with a reason.
        candidates = streamable if target in ("step", "run") and draw(st.integers(0, 4)) else models
        model = draw(st.sampled_from(candidates))
        features = model.input_features
        if target == "file":
            suffix, contents = file_contents(draw)
            path = workdir / f"input{suffix}"
            path.write_bytes(contents)
            description = f"read_array({suffix!r} of {len(contents)} bytes: {contents[:80]!r})"
        else:
            well_formed = {"predict": (None, None, features), "run": (None, None, features),
                           "step": (None, features), "initial_state": (2, max(model.state_shapes))}[target]
            array = draw(hostile_arrays(st, well_formed))
            description = f"{target} on {array.dtype} {array.shape} (strides {array.strides})"
        tally.start(description)
        try:
            if target == "file":
                x = read_array(path)
                assert isinstance(x, np.ndarray) and x.dtype.kind in "fiub", x.dtype
                x = x[None] if suffix == ".csv" else x  # as the CLI does: a CSV is one sequence
                result = model.predict(x)
            elif target == "predict":
                x = array
                result = model.predict(x)
            elif target == "initial_state":
                x = np.ones((2, 3, features), np.float32)  # > 0, for the log transform
                states = [array[:, :units] if array.ndim == 2 else array for units in model.state_shapes]
                result = model.predict(x, initial_state=states)
            else:
                x = None
                # A model that cannot stream (bidirectional, windowed transforms) refuses with an InputError.
                stream = model.stream(batch=array.shape[0] if array.ndim > 1 and array.shape[0] else 1)
                result = stream.step(array) if target == "step" else stream.run(array)
        except InputError as error:
            tally.refused(description, error)
            return
        except Exception:
            tally.unexpected_error(description)
            return
        outputs = result if isinstance(result, list) else [result]
        shapes = [getattr(output, "shape", None) for output in outputs]
        expected = shapes if x is None else output_shapes(model.spec, model.shapes, x.shape[0], x.shape[1])
        if all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in outputs) and shapes == expected:
            tally.counts["answered"] += 1
        else:
            tally.unexpected_error(f"{description}: returned {[type(o) for o in outputs]} of shapes {shapes}, "
                                   f"expected float32 arrays of shapes {expected}")

    case()
    return tally.report()


def child(arguments: list[str]) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))
    mode, examples, workdir, progress = arguments
    sys.path.insert(0, str(Path(__file__).parent))
    run = {"bundles": fuzz_bundles, "inputs": fuzz_inputs}[mode]
    print(run(int(examples), workdir, progress))


if __name__ == "__main__":
    child(sys.argv[1:])
