"""The C export compiled with the system compiler and run against the engine.

Every model of the parity matrix (tests/models.py), plus transform and masking variants, is
written as C, compiled under strict warnings as C99 (and parsed as C++17), loaded through ctypes
and compared with ``Model.predict`` and ``Stream.step``; so is every front-end case of the Conv1D,
pooling and BatchNormalization tests (tests/test_conv.py). No TensorFlow: the specs get random
weights (tests/reference.py), which is all the C writer reads.
"""

from __future__ import annotations

import ctypes
import re
import subprocess

import numpy as np
import pytest

from gru_engine import Model, frontends
from gru_engine.errors import UnsupportedModelError
from gru_engine.exporters import c_build, export_c
from gru_engine.exporters.c_api import main_count
from gru_engine.exporters.c_writer import INT8_MARGIN, CCode, build_c, dequantized
from gru_engine.spec import RECURRENT_FAMILIES, Layer, ModelSpec, max_excess
from c_harness import build_libraries, write_sources
from models import FAMILY_MATRIX, PARITY_MATRIX, random_input
from reference import gru_config, random_spec, recurrent_config
from test_conv import CASES as FRONTEND_CASES

pytestmark = pytest.mark.skipif(c_build.compiler() is None, reason="no C compiler")

FEATURES = 3
STEPS = 11


def spec_layers(description: list[dict]) -> list[Layer]:
    """A parity-matrix description as spec layers with Keras's defaults (Dropout is dropped)."""
    layers = []
    for index, entry in enumerate(description):
        kind = entry["kind"]
        options = {k: v for k, v in entry.items() if k not in ("kind", "merge_mode", "layer")}
        name = f"{kind}_{index}"
        if kind in RECURRENT_FAMILIES or kind == "bidirectional":
            options.setdefault("zero_output_for_mask", options.get("return_sequences", False))
            units = options.pop("units")
        if kind in RECURRENT_FAMILIES:
            layers.append(Layer(kind, name, recurrent_config(kind, units, **options)))
        elif kind == "bidirectional":
            wrapped = entry.get("layer", "gru")
            config = {"merge_mode": entry.get("merge_mode", "concat"),
                      "forward": recurrent_config(wrapped, units, **options),
                      "backward": recurrent_config(wrapped, units, **dict(options, go_backwards=True))}
            layers.append(Layer("bidirectional", name, config if wrapped == "gru" else dict(config, layer=wrapped)))
        elif kind == "dense":
            layers.append(Layer("dense", name, {"units": options["units"],
                                                "activation": options.get("activation", "linear"),
                                                "use_bias": options.get("use_bias", True)}))
        elif kind == "masking":
            layers.append(Layer("masking", name, dict(options)))
        elif kind == "conv1d":
            layers.append(Layer(kind, name, {"strides": 1, "padding": "valid", "dilation_rate": 1, "groups": 1,
                                             "activation": "linear", "use_bias": True, **options}))
        elif kind in frontends.POOLING_KINDS:
            layers.append(Layer(kind, name, {"padding": "valid", **options,
                                             "strides": options.get("strides") or options["pool_size"]}))
        elif kind == "batch_normalization":
            layers.append(Layer(kind, name, {"epsilon": 1e-3, "center": True, "scale": True, **options}))
        elif kind in frontends.GLOBAL_POOLING_KINDS:
            layers.append(Layer(kind, name, {}))
    return layers


AFFINE = {"kind": "affine", "scale": [0.5, 2.0, 1.0], "offset": [0.1, -0.2, 0.0], "output_scale": [0.01, 0.02],
          "output_offset": [-0.5, 0.25]}
EXTRA = {
    # zero_output_for_mask=False on a sequence: masked steps repeat the previous output.
    "masking-previous-output": ([Layer("masking", "masking", {"mask_value": 0.0}),
                                 Layer("gru", "gru", gru_config(6, return_sequences=True)),
                                 Layer("gru", "gru_1", gru_config(4, return_sequences=True, go_backwards=True))], []),
    "masking-stream": ([Layer("masking", "masking", {"mask_value": 0.0}),
                        Layer("gru", "gru", gru_config(6, return_sequences=True, zero_output_for_mask=True)),
                        Layer("gru", "gru_1", gru_config(4)),
                        Layer("dense", "dense", {"units": 2, "activation": "softmax", "use_bias": True})], []),
    "transforms-affine-log": ([Layer("gru", "gru", gru_config(5, return_sequences=True)),
                               Layer("dense", "dense", {"units": 2, "activation": "linear", "use_bias": True})],
                              [AFFINE, {"kind": "log", "invert_output": True}]),
    "transforms-center": ([Layer("gru", "gru", gru_config(5)),
                           Layer("dense", "dense", {"units": 2, "activation": "linear", "use_bias": True})],
                          [{"kind": "log", "invert_output": True},
                           {"kind": "center", "invert_output": True, "output_features": [0, 2]},
                           dict(AFFINE, output_scale=None, output_offset=None)]),
    "bidirectional-none-state": ([Layer("bidirectional", "bidi", {
        "merge_mode": None, "forward": gru_config(4, return_sequences=True, return_state=True),
        "backward": gru_config(3, return_sequences=True, return_state=True, go_backwards=True)})], []),
    "odd-layer-names": ([Layer("gru", "model/gru.1", gru_config(3, return_sequences=True)),
                         Layer("dense", "int", {"units": 2, "activation": "relu", "use_bias": False})], []),
}


def _specs() -> dict:
    specs = {}
    for index, (case, description) in enumerate(sorted({**PARITY_MATRIX, **FAMILY_MATRIX}.items())):
        name = "m_" + case.replace("-", "_").lower()
        specs[name] = random_spec(spec_layers(description), FEATURES, seed=index, check_shape=(2, 6))
    for index, (case, (layers, transforms)) in enumerate(EXTRA.items()):
        spec = random_spec(layers, FEATURES, seed=100 + index, check_shape=(2, 6), transforms=transforms)
        specs["x_" + case.replace("-", "_")] = spec
    for index, (case, (description, features)) in enumerate(sorted(FRONTEND_CASES.items())):
        layers = spec_layers(description)
        check_steps = max(6, frontends.min_steps(ModelSpec(features, layers, {})))
        specs["f_" + case.replace("-", "_")] = random_spec(layers, features, seed=200 + index,
                                                           check_shape=(2, check_steps))
    return specs


SPECS = _specs()


def case_input(name: str, steps: int = STEPS, seed: int = 1) -> np.ndarray:
    """(steps, F), longer where 'valid' windows need it: with Masking, some steps are padding; with a
    log transform, positive."""
    spec = SPECS[name]
    steps = max(steps, frontends.min_steps(spec) + 3)
    mask_value = next((layer.config["mask_value"] for layer in spec.layers if layer.kind == "masking"), None)
    x = random_input(1, steps, spec.input_features, seed=seed, mask_value=mask_value)[0]
    if mask_value is not None:
        x[0] = mask_value  # a leading masked step: before any output, predict emits zeros, a stream the carry
    if any(step["kind"] == "log" for step in spec.transforms):
        x = np.abs(x) + np.float32(0.5)
    return x


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    directory = tmp_path_factory.mktemp("c-export")
    written = write_sources(SPECS, directory)
    return written, directory, build_libraries(written, directory, "f32")


def main_output(spec, outputs):
    """What the C predict writes: the main output, both halves side by side for merge_mode=None."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    last = spec.layers[-1]
    if last.kind == "bidirectional" and last.config["merge_mode"] is None:
        return np.concatenate(outputs[:2], axis=-1)
    return outputs[0]


def assert_close(actual, expected, what):
    excess = max_excess(np.asarray(actual, np.float32), np.asarray(expected, np.float32))
    assert excess <= 0, f"{what}: beyond tolerance by {excess:.3g}\nC:      {actual}\nengine: {expected}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_c_predict_matches_the_engine(compiled, name):
    models = compiled[2]
    spec, c_model = SPECS[name], models[name]
    model = Model(spec)
    x = case_input(name)
    assert_close(c_model.predict(x), main_output(spec, model.predict(x[None]))[0], "predict")
    # From a non-zero initial state, which predict_from leaves holding the final carries.
    rng = np.random.default_rng(2)
    initial = [rng.standard_normal((1, units)).astype(np.float32) * 0.5 for units in model.state_shapes]
    carries = np.concatenate([s[0] for s in initial])
    fields, offset = [], 0
    for _, floats, index in c_model.code.report["state_fields"]:
        if spec.layers[index].kind == "conv1d":  # predict pads a causal Conv1D with zeros, whatever it streamed
            fields.append(np.full(floats, 9.0, np.float32))
        else:
            fields.append(carries[offset:offset + floats])
            offset += floats
    state = c_model.new_state()
    state.raw = np.concatenate(fields).astype(np.float32).tobytes()
    outputs = model.predict(x[None], initial_state=initial)
    assert_close(c_model.predict_from(state, x), main_output(spec, outputs)[0], "predict_from")
    finals = c_model.state_floats(state)
    states = outputs[main_count(spec):] if isinstance(outputs, list) else []
    if states:
        expected = np.concatenate([s[0] for s in states])
        assert_close(finals[len(finals) - len(expected):], expected, "return_state")
    assert c_model.self_check()[0] == 0


@pytest.mark.parametrize("name", sorted(name for name in SPECS if build_c(SPECS[name], name).report["can_stream"]))
def test_c_step_matches_the_engine_stream(compiled, name):
    c_model = compiled[2][name]
    model = Model(SPECS[name])
    x, other = case_input(name), case_input(name, seed=5)
    stream, other_stream = model.stream(), model.stream()
    state, other_state = c_model.new_state(), c_model.new_state()
    saved = None
    for t in range(len(x)):
        # Two interleaved states stay independent.
        assert_close(c_model.step(state, x[t]), stream.step(x[t]), f"step {t}")
        assert_close(c_model.step(other_state, other[t]), other_stream.step(other[t]), f"other step {t}")
        if t == 4:
            saved = state.raw  # memcpy of the struct
    resumed = c_model.new_state()
    resumed.raw = saved
    replay = [c_model.step(resumed, x[t]) for t in range(5, len(x))]
    again = c_model.new_state()
    again.raw = saved
    assert all(np.array_equal(a, c_model.step(again, x[t])) for a, t in zip(replay, range(5, len(x))))


# Every family, transform and output form, float32 and int8 (g++ parses big initialisers slowly).
CPP_CASES = ["m_airline", "m_masking_bidirectional", "m_bidirectional_none", "m_dense_softmax",
             "m_lstm_masking_bidirectional", "m_mixed_simple_rnn_dense_lstm_gru",
             "x_transforms_center", "x_transforms_affine_log", "x_masking_stream", "x_odd_layer_names",
             "f_causal_dilated_stack", "f_pool_2_s1", "f_masking_global_average", "f_bn_applied_after_relu_conv"]


def test_c_compiles_as_cpp(compiled, compiled_int8):
    import concurrent.futures

    written, directory, _ = compiled
    sources = [written[name][1] for name in CPP_CASES] + [source for _, source in compiled_int8[2].values()]

    def parse(source):
        c_build.run_compiler([*c_build.CXX_FLAGS, "-fsyntax-only", f"-I{source.parent}", str(source)], cxx=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(parse, sources))


SANITIZED_MAIN = """#include <stdio.h>
#include <stdlib.h>
#include "{name}.h"

int main(void)
{{
    enum {{ STEPS = 9 }};
    float x[STEPS * {upper}_INPUT_FEATURES], y[STEPS * {upper}_OUTPUT_FEATURES], error;
    float *work = (float *)malloc({name}_work_floats(STEPS) * sizeof(float));
    {name}_state state;
    size_t i;
    for (i = 0; i < sizeof x / sizeof x[0]; i++)
        x[i] = (float)((i * 7) % 5) * 0.25f + 0.5f;
    {name}_predict(x, STEPS, y, work);
    {name}_reset(&state);
    {stream}
    free(work);
    printf("%g\\n", (double)y[0]);
    return {name}_self_check(&error);
}}
"""


def test_c_runs_clean_under_address_and_undefined_behaviour_sanitizers(compiled, tmp_path):
    written, directory, _ = compiled
    for name in ("m_mixed_masking_gru_bidirectional_simple_rnn", "x_transforms_center", "x_masking_stream",
                 "f_conv_causal_s1_d2_g2_k24", "f_conv_same_s3_d1_g2_k13", "f_pool_3_s2", "f_bn_after_dense"):
        stream = "" if not written[name][0].report["can_stream"] else \
            f"for (i = 0; i < STEPS; i++) {name}_step(&state, x + i * {name.upper()}_INPUT_FEATURES, y);"
        main = tmp_path / f"main_{name}.c"
        main.write_text(SANITIZED_MAIN.format(name=name, upper=name.upper(), stream=stream))
        binary = c_build.build([main, written[name][1]], tmp_path / name, flags=c_build.SANITIZE_FLAGS,
                               extra=(f"-I{directory}",))
        done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr, f"{name}: {done.stderr[-2000:]}"


# ----- int8 -----

INT8_CASES = ["m_airline", "m_masking_bidirectional", "x_transforms_affine_log", "m_dense_softmax",
              "m_mixed_masking_gru_bidirectional_simple_rnn", "f_conv_causal_s1_d2_g2_k24", "f_bn_folded_after_conv"]


@pytest.fixture(scope="session")
def compiled_int8(tmp_path_factory):
    from gru_engine.exporters.c_writer import int8_deviation
    directory = tmp_path_factory.mktemp("c-export-int8")
    specs = {f"{name}_q": SPECS[name] for name in INT8_CASES}
    deviations = {name: int8_deviation(spec) for name, spec in specs.items()}
    tolerances = {name: (1e-5 + INT8_MARGIN * d["self_check_vs_stored"], 1e-4) for name, d in deviations.items()}
    written = write_sources(specs, directory, "int8", tolerances)
    return specs, deviations, written, build_libraries(written, directory, "i8")


@pytest.mark.parametrize("name", INT8_CASES)
def test_int8_c_matches_the_engine_on_the_int8_weights(compiled_int8, name):
    specs, deviations, written, models = compiled_int8
    name = name + "_q"
    spec, c_model = specs[name], models[name]
    x = case_input(name[:-2])
    rounded, exact = Model(dequantized(spec)), Model(spec)
    actual = c_model.predict(x)
    assert_close(actual, main_output(spec, rounded.predict(x[None]))[0], "int8 predict vs engine on int8 weights")
    # And its distance from the float32 model is of the size the export measured (in network units).
    distance = np.max(np.abs(actual - main_output(spec, exact.predict(x[None]))[0]))
    measured = max(deviations[name]["random_vs_float32"], deviations[name]["self_check_vs_float32"])
    assert 0 < distance <= (10 * measured if not spec.transforms else np.inf)
    assert c_model.self_check()[0] == 0


# ----- the export itself -----

def test_export_c_writes_both_files_and_reports_sizes(tmp_path):
    from gru_engine import bundle
    path = bundle.save(SPECS["m_airline"], tmp_path / "airline.gru.safetensors")
    result = export_c(path, tmp_path / "out", name="airline", weights="int8")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["airline.c", "airline.h"]
    header = result.header.read_text()
    assert "bundle airline.gru.safetensors" in header and "gru-engine" in header and 'extern "C"' in header
    source = result.source.read_text()
    # Portable C99 with no allocation and no mutable globals: the object has no data or bss at all.
    assert set(re.findall(r"#include <([^>]+)>", source + header)) == {"stddef.h", "stdint.h", "string.h", "math.h"}
    assert "malloc" not in source
    report = result.report
    assert report["object"]["data"] == report["object"]["bss"] == 0
    assert report["object"]["rodata"] >= report["weight_bytes"] > 0
    # int8: a byte per weight plus a float scale per column, about a quarter of float32.
    assert report["weight_bytes"] < 0.3 * build_c(SPECS["m_airline"], "f").report["weight_bytes"]
    summary = result.summary()
    assert "int8 largest deviation" in summary and "state: 400 bytes" in summary


def test_c_activations_use_float_only():
    """A Cortex-M4F's FPU has no double, so tanh and sigmoid must not use it (only the transforms do)."""
    source = build_c(SPECS["m_airline"], "airline").source
    activations = source[source.index("static inline float exp_nonpositive"):source.index("enum { ACT_LINEAR")]
    assert "tanh_approx" in activations and "sigmoid_approx" in activations
    assert "double" not in activations


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "int", "a b", "x" * 64, None])
def test_export_c_refuses_a_name_that_is_not_a_c_identifier(tmp_path, name):
    with pytest.raises(ValueError, match="not a usable C identifier"):
        export_c(SPECS["m_airline"], tmp_path, name=name)
    assert list(tmp_path.iterdir()) == []


def test_the_c_writer_writes_every_kind_the_engine_runs():
    from gru_engine.exporters.c_layers import FAMILIES
    from gru_engine.spec import LAYER_KINDS
    assert set(FAMILIES) == set(LAYER_KINDS + frontends.KINDS)
    written = {layer.kind for name, spec in SPECS.items() for layer in spec.layers}
    assert written == set(FAMILIES)


def test_export_c_refuses_a_layer_kind_it_cannot_express_naming_it(tmp_path):
    spec = SPECS["m_airline"]
    alien = Layer("attention", "my_attention", {}, {})
    broken = type(spec)(spec.input_features, [alien] + spec.layers, spec.source)
    with pytest.raises(UnsupportedModelError, match="layer 0 'my_attention' is a 'attention' layer"):
        export_c(broken, tmp_path / "out", name="model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, named", [
    ({"activation": "elu"}, "activation 'elu'"),
    ({"recurrent_activation": "hard_sigmoid", "recurrent_activation_alpha": 0.2}, "recurrent_activation_alpha 0.2"),
    ({"clip": 3.0}, "clip 3.0"),
])
def test_export_c_refuses_onnx_activation_options_naming_layer_and_option(tmp_path, options, named):
    """GRUs imported from ONNX may use activations, alpha/beta or a cell clip that the C does not compute."""
    spec = random_spec([Layer("gru", "onnx_gru", gru_config(3, **options))], 2, seed=3)
    with pytest.raises(UnsupportedModelError, match=f"layer 0 'onnx_gru' uses {named}.*C writer does not"):
        export_c(spec, tmp_path / "out", name="model")
    assert not (tmp_path / "out").exists()


def test_export_c_refuses_an_unwritable_directory_and_unknown_weights(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot create the output directory|not a writable directory"):
        export_c(SPECS["m_airline"], blocker / "sub", name="model")
    with pytest.raises(ValueError, match="weights 'int4' is not supported"):
        export_c(SPECS["m_airline"], tmp_path / "out", weights="int4")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_export_c_failure_while_writing_leaves_neither_file(tmp_path, monkeypatch):
    from gru_engine.exporters import c_writer

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(c_writer.Path, "write_text", fail)
    with pytest.raises(OSError):
        export_c(SPECS["m_airline"], tmp_path, name="model", object_report=False)
    assert list(tmp_path.iterdir()) == []


def test_masking_input_is_exercised():
    """The masked cases really contain padded steps (else the masking comparisons prove nothing)."""
    for name, spec in SPECS.items():
        value = next((layer.config["mask_value"] for layer in spec.layers if layer.kind == "masking"), None)
        if value is not None:
            assert (case_input(name) == value).all(axis=1).sum() >= 2, name


def test_cli_export_c_prints_the_report_and_refuses_bad_names(tmp_path, capsys):
    from gru_engine import bundle, cli
    path = bundle.save(SPECS["x_masking_stream"], tmp_path / "masked.gru.safetensors")
    assert cli.main(["export-c", str(path), "--out", str(tmp_path / "c"), "--name", "masked"]) == 0
    printed = capsys.readouterr().out
    assert "weights (float32)" in printed and "state:" in printed and "work_floats(6)" in printed
    assert cli.main(["export-c", str(path), "--out", str(tmp_path / "d"), "--name", "no-dash"]) == 1
    assert "not a usable C identifier" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def readme_example() -> str:
    """The complete C program in the README's "Embedded: export to C" section."""
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Embedded: export to C", 1)[1]
    return next(block.split("\n", 1)[1] for block in section.split("```c")[1:] if "int main" in block).split("```")[0]


def test_the_readme_c_example_compiles_and_runs_an_airline_model(tmp_path):
    from gru_engine.spec import Layer as L
    # The demo's tutorial shape: GRU(50) -> GRU(50) -> Dense(1), min-max scaling declared as transforms.
    scaling = {"kind": "affine", "scale": [1 / 500], "offset": [-0.2], "output_scale": [1 / 500], "output_offset": [-0.2]}
    spec = random_spec([L("gru", "gru", gru_config(50, return_sequences=True)), L("gru", "gru_1", gru_config(50)),
                        L("dense", "dense", {"units": 1, "activation": "linear", "use_bias": True})], 1, seed=3,
                       check_shape=(2, 10), transforms=[scaling])
    export_c(spec, tmp_path, name="airline", object_report=False)
    (tmp_path / "main.c").write_text(readme_example())
    binary = c_build.build([tmp_path / "main.c", tmp_path / "airline.c"], tmp_path / "example",
                           extra=(f"-I{tmp_path}",))
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    months = np.float32([419, 461, 472, 535, 622, 606, 508, 461, 390, 432])[None, :, None]
    expected = float(Model(spec).predict(months)[0, 0])
    printed = [float(value) for value in re.findall(r"(-?\d+\.\d)", done.stdout)]
    assert len(printed) == 2 and all(abs(value - expected) <= 0.05 + 1e-4 * abs(expected) for value in printed), \
        (done.stdout, expected)


def test_export_c_takes_an_onnx_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from gru_engine.exporters import export_onnx
    spec = SPECS["m_bidirectional_concat"]
    path = export_onnx(spec, tmp_path / "model.onnx")
    result = export_c(path, tmp_path / "c", name="from_onnx", object_report=False)
    assert "ONNX file model.onnx" in result.header.read_text()
    code = CCode(result.header.read_text(), result.source.read_text(), result.report)
    models = build_libraries({"from_onnx": (code, result.source)}, tmp_path / "c", "onnx")
    x = case_input("m_bidirectional_concat")
    assert_close(models["from_onnx"].predict(x), Model(spec).predict(x[None])[0], "C from ONNX vs engine")
    assert models["from_onnx"].self_check()[0] == 0


def test_c_output_rows_follow_the_time_axis_and_short_inputs_write_nothing(compiled):
    """Strided Conv1D and pooling shorten the sequence: NAME_output_steps says by how much, and
    below NAME_MIN_STEPS (a 'valid' window longer than the input) predict writes nothing."""
    from gru_engine.errors import InputError
    c_model = compiled[2]["f_conv_valid_s2_d1_g1_k35"]
    spec = SPECS["f_conv_valid_s2_d1_g1_k35"]
    assert c_model.min_steps == frontends.min_steps(spec) > 1
    # It cannot stream, and the header says which layer keeps it from it, in the runtime's words.
    assert "_CAN_STREAM 0  /* 1: f_conv_valid_s2_d1_g1_k35_step exists (0: layer 'conv1d_0' has padding 'valid'" \
        in c_model.code.header
    for steps in range(c_model.min_steps, c_model.min_steps + 5):
        assert c_model.output_steps(steps) == frontends.output_steps(spec, steps) < steps
    assert c_model.output_steps(c_model.min_steps - 1) == 0
    y = np.full(4, 7.0, np.float32)
    short = np.ones((c_model.min_steps - 1, spec.input_features), np.float32)
    c_model._predict(short.ravel(), len(short), y, c_model.work(len(short)))
    assert (y == 7.0).all()
    with pytest.raises(InputError, match=f"needs at least {c_model.min_steps}"):
        c_model.predict(short)


def test_the_ctypes_binding_refuses_arrays_the_c_would_overrun(compiled):
    from gru_engine.errors import InputError
    c_model = compiled[2]["m_airline"]
    for bad in (np.ones((4, FEATURES + 1)), np.ones((0, FEATURES)), np.full((4, FEATURES), np.nan), np.ones(FEATURES)):
        with pytest.raises(InputError, match="features"):
            c_model.predict(bad)
    with pytest.raises(InputError, match="new_state"):
        c_model.step(bytearray(8), np.ones(FEATURES))


def keras_initial_lstm_bias(spec: ModelSpec) -> ModelSpec:
    """The spec with Keras's initial LSTM bias (unit_forget_bias: 1 over f, 0 elsewhere) and no
    self-check (it was computed with the random bias)."""
    for layer in spec.layers:
        if layer.kind == "lstm":
            units = layer.config["units"]
            layer.weights["bias"] = np.repeat(np.float32([0, 1, 0, 0]), units)
    spec.self_check_input = spec.self_check_outputs = None
    return spec


def test_c_compiled_for_speed_matches_the_engine(tmp_path):
    """-O3 -march=native (the bench's flags), where compilers take the most liberties. GCC 12.2
    with AVX-512 folds the memcpy of a constant bias into wrong stores in a run function cloned for
    one layer: Keras's initial LSTM bias showed it (see NOT_SPECIALISED in the C)."""
    specs = {"lstm_airline": keras_initial_lstm_bias(random_spec(
        [Layer("lstm", "lstm", recurrent_config("lstm", 50, return_sequences=True)),
         Layer("lstm", "lstm_1", recurrent_config("lstm", 50)),
         Layer("dense", "dense", {"units": 1, "activation": "linear", "use_bias": True})], 1, seed=0))}
    specs.update({name: SPECS[name] for name in ("m_airline", "m_simple_rnn_units_64", "m_masking_bidirectional")})
    written = write_sources(specs, tmp_path)
    for name, spec in specs.items():
        library = c_build.build([written[name][1]], tmp_path / f"lib{name}.so", flags=c_build.FAST_FLAGS,
                                extra=("-shared", "-fPIC", f"-I{tmp_path}"))
        c_model = c_build.CModel(ctypes.CDLL(str(library)), name, written[name][0])
        x = random_input(1, STEPS, spec.input_features, seed=4)[0]
        assert_close(c_model.predict(x), main_output(spec, Model(spec).predict(x[None]))[0], name)
