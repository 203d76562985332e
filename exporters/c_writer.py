"""ModelSpec -> dependency-free C99 (``NAME.h`` and ``NAME.c``), and ``export_c``.

The generated code uses only <stddef.h>, <stdint.h>, <string.h> and <math.h>: no malloc, no
mutable globals, no variable-length arrays, no recursion. Weights are ``static const`` (flash on a
microcontroller); the state is a struct the caller owns. One C function per layer family
(``c_layers.FAMILIES``), called in turn by a generated ``network`` function that holds the chain.

Semantics are the engine's (``gru_engine.runtime``): ``NAME_predict`` is ``Model.predict`` on one
sequence, ``NAME_step`` is ``Stream.step`` (a masked step emits the carry), and the bundle's
transforms are applied inside both, in double precision as the engine does. tanh and sigmoid are
the engine's float32 formulas (within 9.1e-8 of exact), so C and engine agree to rounding.

int8 weights ("w8a32"): every kernel is stored as int8 with one float32 scale per output column
(symmetric: scale = max|column| / 127); activations, biases and state stay float32.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from gru_engine import frontends
from gru_engine import transforms as transform_steps
from gru_engine.errors import UnsupportedModelError
from gru_engine.fileio import atomic_write
from gru_engine.spec import PARITY_ATOL, PARITY_RTOL, Layer, ModelSpec, sample_input, stream_blockers, validate

from . import c_build
from .c_api import (api_c, c_array, float_literal, header_c, header_comment, main_width_of, network_c,
                    self_check_c, transforms_c)
from .c_layers import ACTIVATION_CONSTANTS, CORE_C, FAMILIES, MATRIX_FIELDS, matvec_source

WEIGHT_TYPES = ("float32", "int8")
C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for goto if inline
int long register restrict return short signed sizeof static struct switch typedef union unsigned void volatile
while _Bool _Complex _Imaginary bool class delete namespace new operator private protected public template this
throw try catch virtual friend mutable explicit typename using export asm""".split())
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
# int8 deviation: the self-check tolerance is this many times the deviation measured at export.
INT8_MARGIN = 2.0
# The longer random sequence the int8 deviation is measured on.
INT8_PROBE_STEPS = 200
# A recurrent layer's weight rows are padded with zero columns to a multiple of this many floats
# (one 512-bit vector): its products over whole rows then have no scalar remainder (measured here,
# the three products of a GRU(50) stack's step: 150 columns 1.32 us, padded to 160: 0.93 us).
LANES = 16


def padded(n: int) -> int:
    """n rounded up to a multiple of LANES: the stored row width of a weight matrix of n columns."""
    return (n + LANES - 1) // LANES * LANES


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in C_KEYWORDS:
        raise ValueError(f"name {name!r} is not a usable C identifier; use letters, digits and underscores, "
                         "starting with a letter (at most 63 characters, not a C keyword), e.g. --name airline")
    return name


def quantize(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (values (rows, cols) int8, scale (cols,) float32)."""
    peak = np.abs(array).max(axis=0)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
    return values, scale


def dequantized(spec: ModelSpec) -> ModelSpec:
    """The spec with every kernel replaced by its int8 reconstruction: what the int8 C code computes.

    The families pass exactly the tensors named ``*kernel`` to ``_Writer.matrix`` (the one place
    that quantizes), after folding BatchNormalization as the C writer does, a Conv1D's as
    (kernel_size * channels, filters); so this is the same set, quantized the same way.
    """
    layers = []
    for layer, _ in frontends.fold_batch_norms(spec.layers, validate(spec)):
        weights = {}
        for name, array in layer.weights.items():
            if name.endswith("kernel"):
                values, scale = quantize(array.reshape(-1, array.shape[-1]))
                array = (values.astype(np.float32) * scale).astype(np.float32).reshape(array.shape)
            weights[name] = array
        layers.append(Layer(layer.kind, layer.name, layer.config, weights))
    return dataclasses.replace(spec, layers=layers)


@dataclasses.dataclass
class _Flow:
    """Where the sequence is while the network's body is generated."""

    current: str = "a"
    masked: bool = False
    streaming_read: bool = False  # some layer runs differently in step (masked steps, Conv1D history)

    def swap(self) -> str:
        """The layer writes its output to the other buffer, which becomes the current one."""
        self.current = "b" if self.current == "a" else "a"
        return self.current


class _Writer:
    """Collects what the families declare, then renders the two files."""

    def __init__(self, spec: ModelSpec, shapes, weights: str):
        self.spec, self.shapes, self.weight_type = spec, shapes, weights
        self.flow = _Flow()
        self.arrays: list[str] = []
        self.tables: list[str] = []
        self.fields: list[tuple[str, int, str, int]] = []  # (name, floats, comment, layer index)
        self.layer_index = 0
        self.body: list[str] = []
        self.chunks: list[str] = []  # the C the layers need, each part once
        self.idents: set[str] = set()
        self.weight_bytes = 0
        self.scratch_floats = 0
        self.back_units = 0
        self.masking = False
        # The runtime's rule: no layer looks ahead or resizes the time axis, and the transforms stream.
        self.blockers = stream_blockers(spec)
        self.can_stream = not self.blockers and transform_steps.streamable(spec.transforms)
        self.folds: set[str] = set()  # names of the layers a BatchNormalization was folded into
        self.max_width = max([spec.input_features] + [shape.output_dim for shape in shapes])

    # ----- what the families call -----

    float_literal = staticmethod(float_literal)
    padded = staticmethod(padded)

    def ident(self, index: int, layer: Layer) -> str:
        base = re.sub(r"\W", "_", layer.name, flags=re.ASCII).strip("_") or layer.kind
        if not base[0].isalpha():
            base = f"layer{index}_{base}"
        if base in self.idents or base in C_KEYWORDS:
            base = f"layer{index}_{base}"
        self.idents.add(base)
        return base

    def vector(self, name: str, array, comment: str, width: int | None = None) -> str:
        """Declare a float vector; ``width``: padded with zeros to that many floats (a gate row's bias)."""
        array = np.asarray(array, np.float32)
        if width is not None and width > len(array):
            comment += f", zeros after {len(array)}"
            array = np.concatenate([array, np.zeros(width - len(array), np.float32)])
        self.arrays.append(c_array("float", name, array, comment, aligned=True))
        self.weight_bytes += array.nbytes
        return name

    def bias(self, name: str, bias, comment: str, pad: bool = False) -> str:
        """Declare a layer's bias with ``vector`` (``pad``: zeros up to a multiple of LANES, like a
        padded matrix's rows), or return NULL for a layer without one (Keras use_bias=False)."""
        if bias is None:
            return "NULL"
        return self.vector(name, bias, comment, self.padded(len(bias)) if pad else None)

    def matrix(self, name: str, array, comment: str, pad: bool = False) -> str:
        """Declare a weight matrix; return the initialiser of its ``Matrix`` struct. ``pad``: its rows
        padded with zero columns to a multiple of LANES, for a layer whose products run over whole
        rows of its scratch (the recurrent kinds; Dense and Conv1D write rows of their exact width)."""
        array = np.asarray(array, np.float32)
        rows, cols = array.shape
        if pad and padded(cols) > cols:
            comment += f", zero columns {cols}..{padded(cols) - 1}"
            array = np.concatenate([array, np.zeros((rows, padded(cols) - cols), np.float32)], axis=1)
        if self.weight_type == "float32":
            self.vector(name, array, comment)
            return f"{{ &{name}[0][0], {array.shape[1]} }}"
        values, scale = quantize(array)
        self.arrays.append(c_array("int8_t", name, values, comment + ", int8", aligned=True))
        self.vector(f"{name}_scale", scale, f"{name} scale per column")
        self.weight_bytes += values.nbytes
        return f"{{ &{name}[0][0], {name}_scale, {array.shape[1]} }}"

    def table(self, text: str) -> None:
        self.tables.append(text)

    def state_field(self, name: str, size: int, comment: str) -> str:
        self.fields.append((name, size, comment, self.layer_index))
        return name

    def scratch(self, floats: int) -> None:
        # A whole number of lines: the sequence buffers after it start on a line where work does.
        self.scratch_floats = max(self.scratch_floats, padded(floats))

    def backward_buffer(self, units: int) -> None:
        self.back_units = max(self.back_units, units)

    def uses_mask(self) -> None:
        self.masking = True

    def mask_arg(self) -> str:
        return "mask" if self.flow.masked else "NULL"

    def call(self, index: int, layer: Layer, what: str, lines: list[str]) -> None:
        self.body.append(f"    /* layer {index} '{layer.name}': {what} */")
        self.body += ["    " + line for line in lines]

    # ----- rendering -----

    def folded(self, layer: Layer) -> bool:
        return layer.name in self.folds

    def generate(self) -> None:
        names = [layer.name for layer in self.spec.layers]
        pairs = frontends.fold_batch_norms(self.spec.layers, self.shapes)
        kept = {layer.name for layer, _ in pairs}
        self.folds = {names[index - 1] for index, layer in enumerate(self.spec.layers)
                      if layer.kind == "batch_normalization" and layer.name not in kept}
        for layer, shape in pairs:
            index = names.index(layer.name)  # its place in the model, for comments and return_state
            family = FAMILIES[layer.kind]
            self.layer_index = index
            self.chunks += [chunk for chunk in family.c_sources(layer) if chunk not in self.chunks]
            family.emit(self, index, layer, shape)

    def per_step_floats(self) -> int:
        return 2 * self.max_width + self.back_units + (1 if self.masking else 0)

    def work_floats(self, steps: int) -> int:
        return steps * self.per_step_floats() + self.scratch_floats


@dataclasses.dataclass
class CCode:
    header: str
    source: str
    report: dict


def _refuse_onnx_options(spec: ModelSpec) -> None:
    """The C has Keras's recurrent activations only: refuse ONNX's others, their alpha/beta and clip."""
    from gru_engine.spec import GRU_PARAMETER_KEYS, ONNX_ACTIVATIONS, RECURRENT_ACTIVATIONS, recurrent_configs

    for index, layer in enumerate(spec.layers):
        for config in recurrent_configs(layer):
            options = [f"{field} {config[field]!r}" for field in ("recurrent_activation", "activation")
                       if config.get(field) in ONNX_ACTIVATIONS]
            options += [f"{key} {config[key]!r}" for key in GRU_PARAMETER_KEYS if key in config]
            if options:
                raise UnsupportedModelError(
                    f"layer {index} '{layer.name}' uses {', '.join(options)} (from an ONNX graph), which the C "
                    f"writer does not implement; it writes the activations {', '.join(RECURRENT_ACTIVATIONS)} at "
                    "Keras's parameters, without clip")


def build_c(spec: ModelSpec, name: str = "model", weights: str = "float32", origin: str | None = None,
            tolerance: tuple[float, float] = (PARITY_ATOL, PARITY_RTOL)) -> CCode:
    """The two files' text for a spec (validated here); ``tolerance``: the self-check's (atol, rtol)."""
    check_name(name)
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights {weights!r} is not supported; use one of {list(WEIGHT_TYPES)}")
    if isinstance(spec, ModelSpec) and isinstance(spec.layers, list):
        for index, layer in enumerate(spec.layers):
            if getattr(layer, "kind", None) not in FAMILIES:
                raise UnsupportedModelError(
                    f"layer {index} '{getattr(layer, 'name', '?')}' is a {getattr(layer, 'kind', '?')!r} layer, which "
                    f"the C writer cannot express; it writes {', '.join(FAMILIES)}")
    shapes = validate(spec)
    _refuse_onnx_options(spec)
    writer = _Writer(spec, shapes, weights)
    writer.generate()
    main_width = main_width_of(spec, shapes)
    transform_lines, centers = transforms_c(spec, main_width) if spec.transforms else ([], 0)
    can_stream = writer.can_stream
    if writer.blockers:
        stream_note = f" (0: layer '{writer.blockers[0][0]}' {writer.blockers[0][1]})"
    elif not can_stream:
        stream_note = " (0: the bundle centers each window on its mean)"
    else:
        stream_note = ""
    output_is_sequence = shapes[-1].output_is_sequence
    comment = header_comment(spec, name, weights, origin or "a model description")
    core = CORE_C % {"matrix_fields": MATRIX_FIELDS[weights],
                     "matvec": matvec_source(weights), **ACTIVATION_CONSTANTS}
    network = network_c(writer, name)
    parts = [comment.replace(f"/* {name}:", f"/* {name}.c:", 1) + "\n",
             f'#include "{name}.h"', "", "#include <math.h>", "#include <stdint.h>", "#include <string.h>",
             core.rstrip(), *[chunk.rstrip() for chunk in writer.chunks], "",
             "/* ----- weights ----- */", "", "\n\n".join(writer.arrays), "", "\n\n".join(writer.tables),
             *transform_lines, "", *network, "", "/* ----- public API ----- */", "",
             *api_c(spec, writer, name, centers, main_width, output_is_sequence, can_stream), "",
             *self_check_c(spec, writer, name, tolerance), ""]
    source = "\n".join(parts)
    header = header_c(spec, writer, name, comment.replace(f"/* {name}:", f"/* {name}.h:", 1), output_is_sequence,
                     can_stream, stream_note)
    check_steps = spec.self_check_input.shape[1] if spec.self_check_input is not None else 1
    report = {"weights": weights, "weight_bytes": writer.weight_bytes,
              "state_bytes": 4 * sum(field[1] for field in writer.fields),
              "work_floats_steps": check_steps, "work_floats": writer.work_floats(check_steps),
              "work_floats_per_step": writer.per_step_floats(), "work_floats_fixed": writer.scratch_floats,
              "can_stream": can_stream,
              "state_fields": [(field, floats, index) for field, floats, _, index in writer.fields]}
    return CCode(header, source, report)


def resolve_model(model) -> tuple[ModelSpec, str]:
    """(spec, where it came from) for a ModelSpec, a bundle, an .onnx file, or a Keras model or file."""
    if isinstance(model, ModelSpec):
        return model, "a model description"
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.name.endswith(".safetensors"):
            from gru_engine import bundle
            return bundle.read(path), f"bundle {path.name}"
        if path.suffix == ".onnx":
            from .onnx_reader import read_onnx
            return read_onnx(path), f"ONNX file {path.name}"
        from .keras_reader import read_keras
        return read_keras(path), f"Keras file {path.name}"
    from .keras_reader import read_keras
    return read_keras(model), f"Keras model '{getattr(model, 'name', 'model')}'"


def _largest_difference(actual, expected) -> float:
    actual = actual if isinstance(actual, list) else [actual]
    expected = expected if isinstance(expected, list) else [expected]
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
               for a, e in zip(actual, expected))


def int8_deviation(spec: ModelSpec) -> dict:
    """How far int8 weights move the outputs (network units): on the self-check input, from the stored
    outputs and from the float32 model; on a longer random sequence, from the float32 model."""
    from gru_engine.runtime import Model

    exact, rounded = Model(spec), Model(dequantized(spec))
    probe = sample_input(spec, 1, INT8_PROBE_STEPS, np.random.default_rng(0))
    result = {"probe_steps": INT8_PROBE_STEPS,
              "random_vs_float32": _largest_difference(rounded.predict_raw(probe), exact.predict_raw(probe))}
    if spec.self_check_input is not None:
        x = spec.self_check_input
        result["self_check_vs_float32"] = _largest_difference(rounded.predict_raw(x), exact.predict_raw(x))
        result["self_check_vs_stored"] = _largest_difference(rounded.predict_raw(x), list(spec.self_check_outputs))
    return result


@dataclasses.dataclass
class CExport:
    header: Path
    source: Path
    report: dict

    def summary(self) -> str:
        """The size (and, for int8, deviation) report ``export-c`` prints."""
        r = self.report
        lines = [f"wrote {self.header} and {self.source}",
                 f"  weights ({r['weights']}): {r['weight_bytes']:,} bytes",
                 f"  state: {r['state_bytes']:,} bytes",
                 f"  work_floats({r['work_floats_steps']}) = {r['work_floats']:,} floats "
                 f"({4 * r['work_floats']:,} bytes) for predict at the self-check length",
                 f"  streaming: {'yes' if r['can_stream'] else 'no (predict only)'}"]
        if r.get("object"):
            lines.append(f"  object file (cc -O2): text {r['object']['text']:,} bytes, "
                         f"rodata {r['object']['rodata']:,} bytes")
        deviation = r.get("int8")
        if deviation:
            parts = [f"{deviation['random_vs_float32']:.3g} on a random {deviation['probe_steps']}-step sequence"]
            if "self_check_vs_float32" in deviation:
                parts.insert(0, f"{deviation['self_check_vs_float32']:.3g} on the self-check input")
            lines.append("  int8 largest deviation from the float32 model (network units): " + ", ".join(parts))
            lines.append(f"  self-check tolerance: {r['tolerance'][0]:.3g} + {r['tolerance'][1]:.3g} |expected|")
        return "\n".join(lines)


def _check_directory(out_dir) -> Path:
    directory = Path(out_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{directory}: cannot create the output directory ({exc.strerror}); "
                         "choose a writable --out directory") from None
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{directory}: not a writable directory; choose a writable --out directory")
    return directory


def export_c(model, out_dir, name: str = "model", weights: str = "float32", object_report: bool = True) -> CExport:
    """Write ``out_dir/NAME.h`` and ``out_dir/NAME.c`` for a bundle, .keras/.h5, .onnx, Keras model or spec.

    Both files are written atomically, the .c first and the .h last, and only after the whole
    model has been translated: a refusal leaves nothing behind. Returns the paths and the size
    report (``CExport.summary()`` formats it; int8 adds the measured deviation).
    """
    check_name(name)
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights {weights!r} is not supported; use one of {list(WEIGHT_TYPES)}")
    spec, origin = resolve_model(model)
    tolerance = (PARITY_ATOL, PARITY_RTOL)
    deviation = None
    if weights == "int8":
        build_c(spec, name, weights, origin)  # refuse what C cannot express before measuring
        deviation = int8_deviation(spec)
        tolerance = (PARITY_ATOL + INT8_MARGIN * deviation.get("self_check_vs_stored", 0.0), PARITY_RTOL)
    code = build_c(spec, name, weights, origin, tolerance)
    directory = _check_directory(out_dir)
    header, source = directory / f"{name}.h", directory / f"{name}.c"

    def write_text(text):
        def write(temp):
            Path(temp).write_text(text)
        return write

    def write_both(temp_header):
        write_text(code.header)(temp_header)
        atomic_write(source, write_text(code.source))

    atomic_write(header, write_both)
    report = dict(code.report, tolerance=tolerance)
    if deviation:
        report["int8"] = deviation
    if object_report:
        report["object"] = c_build.object_sizes(source)
    return CExport(header, source, report)
