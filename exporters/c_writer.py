"""ModelSpec -> dependency-free C99 (``NAME.h`` and ``NAME.c``), and ``export_c``.

The generated code uses only <stddef.h>, <stdint.h>, <string.h> and <math.h>: no malloc, no
mutable globals, no variable-length arrays, no recursion. Weights are ``static const`` (flash on a
microcontroller); the state is a struct the caller owns. One C function per layer family
(``c_layers.FAMILIES``), called in turn by a generated ``network`` function that holds the chain.

Semantics are the engine's (``gru_engine.runtime``): ``NAME_predict`` is ``Model.predict`` on one
sequence, ``NAME_step`` is ``Stream.step`` (a masked step emits the carry), and the bundle's
transforms are applied inside both, in double precision as the engine does. tanh and sigmoid use
the engine's rational approximation (error 1.4e-7), so C and engine agree to rounding.

int8 weights ("w8a32"): every kernel is stored as int8 with one float32 scale per output column
(symmetric: scale = max|column| / 127); activations, biases and state stay float32.
"""

from __future__ import annotations

import dataclasses
import keyword
import os
import re
from pathlib import Path

import numpy as np

from gru_engine.errors import UnsupportedModelError
from gru_engine.fileio import atomic_write
from gru_engine.spec import PARITY_ATOL, PARITY_RTOL, Layer, ModelSpec, output_shapes, sample_input, validate

from . import c_build
from .c_layers import FAMILIES

WEIGHT_TYPES = ("float32", "int8")
C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for goto if inline
int long register restrict return short signed sizeof static struct switch typedef union unsigned void volatile
while _Bool _Complex _Imaginary bool class delete namespace new operator private protected public template this
throw try catch virtual friend mutable explicit typename using export asm""".split())
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
# Numbers per line in weight initialisers.
PER_LINE = 8
# int8 deviation: the self-check tolerance is this many times the deviation measured at export.
INT8_MARGIN = 2.0
# The longer random sequence the int8 deviation is measured on.
INT8_PROBE_STEPS = 200

CORE_C = """
/* A row-major weight matrix; `cols` floats (int8: bytes) per row. */
typedef struct {
%(matrix_fields)s
} Matrix;

%(matvec)s

/* tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9, the engine's approximation: polynomials in double
   (recurrences amplify rounding), one float divide; error 1.4e-7 (float32 tanhf: about 1e-7). */
static float tanh_approx(float v)
{
    double x = (double)v, x2, p, q;
    float y;
    x = x < -9.0 ? -9.0 : (x > 9.0 ? 9.0 : x);
    x2 = x * x;
    p = ((((-1.03821162e-11 * x2 + 2.78178600e-08) * x2 + 2.67446258e-05) * x2 + 3.80222599e-03) * x2
         + 1.36261799e-01) * x2 + 9.99999908e-01;
    q = (((1.20278291e-06 * x2 + 3.82464926e-04) * x2 + 2.70007688e-02) * x2 + 4.69594857e-01) * x2 + 1.0;
    y = (float)(x * p) / (float)q;
    return y < -1.0f ? -1.0f : (y > 1.0f ? 1.0f : y);
}

enum { ACT_LINEAR, ACT_TANH, ACT_SIGMOID, ACT_HARD_SIGMOID, ACT_RELU, ACT_SOFTMAX };

/* Keras activations, in place on v[n]. */
static void activate(float *v, size_t n, int activation)
{
    size_t j;
    float peak, total;
    switch (activation) {
    case ACT_TANH:
        for (j = 0; j < n; j++)
            v[j] = tanh_approx(v[j]);
        break;
    case ACT_SIGMOID:  /* sigmoid(x) = (tanh(x / 2) + 1) / 2, exactly */
        for (j = 0; j < n; j++)
            v[j] = 0.5f * tanh_approx(0.5f * v[j]) + 0.5f;
        break;
    case ACT_HARD_SIGMOID:  /* Keras 3: clip(x / 6 + 0.5, 0, 1) (tf.keras 2 used 0.2 x + 0.5) */
        for (j = 0; j < n; j++) {
            const float s = v[j] * (1.0f / 6.0f) + 0.5f;
            v[j] = s < 0.0f ? 0.0f : (s > 1.0f ? 1.0f : s);
        }
        break;
    case ACT_RELU:
        for (j = 0; j < n; j++)
            v[j] = v[j] > 0.0f ? v[j] : 0.0f;
        break;
    case ACT_SOFTMAX:
        peak = v[0];
        for (j = 1; j < n; j++)
            peak = v[j] > peak ? v[j] : peak;
        total = 0.0f;
        for (j = 0; j < n; j++) {
            v[j] = expf(v[j] - peak);
            total += v[j];
        }
        for (j = 0; j < n; j++)
            v[j] /= total;
        break;
    default:  /* ACT_LINEAR */
        break;
    }
}
"""

MATVEC_FLOAT = """/* acc[j] += sum_i v[i] * m[i][first + j] for j < count; four rows per pass, so each acc[j] is
   loaded and stored a quarter as often. */
static void matvec_acc(float *acc, const float *v, size_t rows, const Matrix *m, size_t first, size_t count)
{
    size_t i = 0, j;
    for (; i + 4 <= rows; i += 4) {
        const float v0 = v[i], v1 = v[i + 1], v2 = v[i + 2], v3 = v[i + 3];
        const float *r0 = m->values + i * m->cols + first, *r1 = r0 + m->cols, *r2 = r1 + m->cols, *r3 = r2 + m->cols;
        for (j = 0; j < count; j++)
            acc[j] += (v0 * r0[j] + v1 * r1[j]) + (v2 * r2[j] + v3 * r3[j]);
    }
    for (; i < rows; i++) {
        const float vi = v[i];
        const float *r0 = m->values + i * m->cols + first;
        for (j = 0; j < count; j++)
            acc[j] += vi * r0[j];
    }
}"""

MATVEC_INT8 = """/* acc[j] += scale[first + j] * sum_i v[i] * m[i][first + j] for j < count: the int8 products are
   summed in float over a block of columns, then scaled once per column. */
#define MATVEC_BLOCK 32
static void matvec_acc(float *acc, const float *v, size_t rows, const Matrix *m, size_t first, size_t count)
{
    size_t start, i, j;
    for (start = 0; start < count; start += MATVEC_BLOCK) {
        const size_t n = count - start < MATVEC_BLOCK ? count - start : MATVEC_BLOCK;
        float sum[MATVEC_BLOCK] = {0.0f};
        for (i = 0; i < rows; i++) {
            const float vi = v[i];
            const int8_t *row = m->values + i * m->cols + first + start;
            for (j = 0; j < n; j++)
                sum[j] += vi * (float)row[j];
        }
        for (j = 0; j < n; j++)
            acc[start + j] += sum[j] * m->scale[first + start + j];
    }
}"""

MATRIX_FIELDS = {
    "float32": "    const float *values;\n    size_t cols;",
    "int8": "    const int8_t *values;\n    const float *scale;   /* (cols): float value = int8 value * scale of its column */\n"
            "    size_t cols;",
}


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in C_KEYWORDS:
        raise ValueError(f"name {name!r} is not a usable C identifier; use letters, digits and underscores, "
                         "starting with a letter (at most 63 characters, not a C keyword), e.g. --name airline")
    return name


def float_literal(value) -> str:
    """A float32 as the shortest C literal that reads back exactly."""
    text = str(np.float32(value))
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


def _numbers(flat, formatter) -> list[str]:
    items = [formatter(v) for v in flat]
    return [", ".join(items[start:start + PER_LINE]) for start in range(0, len(items), PER_LINE)]


def c_array(ctype: str, name: str, array: np.ndarray, comment: str) -> str:
    """``static const`` C array and a shape comment; beyond two dimensions, the trailing ones are
    flattened into one row, so ``name[i]`` is one row of the leading axis."""
    array = np.asarray(array)
    shape = tuple(array.shape)
    if array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    formatter = float_literal if ctype == "float" else (lambda v: str(int(v)))
    dims = "".join(f"[{d}]" for d in array.shape)

    def body(part, indent) -> str:
        pad = " " * indent
        if part.ndim == 1:
            return "\n".join(pad + line + "," for line in _numbers(part.ravel(), formatter))
        return "\n".join(f"{pad}{{\n{body(sub, indent + 4)}\n{pad}}}," for sub in part)

    return f"/* {comment}: shape {shape} */\nstatic const {ctype} {name}{dims} = {{\n{body(array, 4)}\n}};"


def quantize(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (values (rows, cols) int8, scale (cols,) float32)."""
    peak = np.abs(array).max(axis=0)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
    return values, scale


def dequantized(spec: ModelSpec) -> ModelSpec:
    """The spec with every kernel replaced by its int8 reconstruction: what the int8 C code computes."""
    layers = []
    for layer in spec.layers:
        weights = {}
        for name, array in layer.weights.items():
            if name.endswith("kernel"):
                values, scale = quantize(array)
                array = (values.astype(np.float32) * scale).astype(np.float32)
            weights[name] = array
        layers.append(Layer(layer.kind, layer.name, layer.config, weights))
    return dataclasses.replace(spec, layers=layers)


@dataclasses.dataclass
class _Flow:
    """Where the sequence is while the network's body is generated."""

    current: str = "a"
    width: int = 0
    masked: bool = False
    streaming_read: bool = False  # some GRU's masked output depends on predict vs step

    def swap(self, width: int) -> str:
        self.current = "b" if self.current == "a" else "a"
        self.width = width
        return self.current


class _Writer:
    """Collects what the families declare, then renders the two files."""

    def __init__(self, spec: ModelSpec, shapes, weights: str):
        self.spec, self.shapes, self.weight_type = spec, shapes, weights
        self.flow = _Flow(width=spec.input_features)
        self.arrays: list[str] = []
        self.tables: list[str] = []
        self.fields: list[tuple[str, int, str]] = []
        self.body: list[str] = []
        self.families: list[str] = []
        self.idents: set[str] = set()
        self.weight_bytes = 0
        self.scratch_floats = 0
        self.back_units = 0
        self.masking = False
        self.max_width = max([spec.input_features] + [shape.output_dim for shape in shapes])

    # ----- what the families call -----

    float_literal = staticmethod(float_literal)

    def ident(self, index: int, layer: Layer) -> str:
        base = re.sub(r"\W", "_", layer.name, flags=re.ASCII).strip("_") or layer.kind
        if not base[0].isalpha():
            base = f"layer{index}_{base}"
        if base in self.idents or base in C_KEYWORDS:
            base = f"layer{index}_{base}"
        self.idents.add(base)
        return base

    def vector(self, name: str, array, comment: str) -> str:
        array = np.asarray(array, np.float32)
        self.arrays.append(c_array("float", name, array, comment))
        self.weight_bytes += array.nbytes
        return name

    def matrix(self, name: str, array, comment: str) -> str:
        """Declare a weight matrix; return the initialiser of its ``matrix`` struct."""
        array = np.asarray(array, np.float32)
        rows, cols = array.shape
        if self.weight_type == "float32":
            self.vector(name, array, comment)
            return f"{{ &{name}[0][0], {cols} }}"
        values, scale = quantize(array)
        self.arrays.append(c_array("int8_t", name, values, comment + ", int8"))
        self.vector(f"{name}_scale", scale, f"{name} scale per column")
        self.weight_bytes += values.nbytes
        return f"{{ &{name}[0][0], {name}_scale, {cols} }}"

    def table(self, text: str) -> None:
        self.tables.append(text)

    def state_field(self, name: str, size: int, comment: str) -> str:
        self.fields.append((name, size, comment))
        return name

    def scratch(self, floats: int) -> None:
        self.scratch_floats = max(self.scratch_floats, floats)

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

    def generate(self) -> None:
        for index, (layer, shape) in enumerate(zip(self.spec.layers, self.shapes)):
            family = FAMILIES[layer.kind]
            for kind in family.needs + (layer.kind,):
                if kind not in self.families:
                    self.families.append(kind)
            family.emit(self, index, layer, shape)

    def per_step_floats(self) -> int:
        return 2 * self.max_width + self.back_units + (1 if self.masking else 0)

    def work_floats(self, steps: int) -> int:
        return steps * self.per_step_floats() + self.scratch_floats


def _header_comment(spec: ModelSpec, name: str, weights: str, origin: str) -> str:
    from gru_engine import __version__
    source = spec.source
    framework = f"{source.get('framework', 'unknown')} {source.get('version', '')}".strip()
    if "backend" in source:
        framework += f" ({source['backend']} backend)"
    chain = " -> ".join(f"{layer.name} ({layer.kind})" for layer in spec.layers)
    return (f"/* {name}: generated by gru-engine {__version__} from {origin}.\n"
            f" * Source framework: {framework}. Weights: {weights}.\n"
            f" * Layers: {chain}.\n"
            " * Re-export rather than edit: gru-engine export-c MODEL --out DIR --name NAME */")


def _transforms_c(spec: ModelSpec, main_width: int) -> tuple[list[str], int]:
    """C for the bundle's transforms (input chain and output inverse, in double); and the count of
    ``center`` steps (their per-window means are computed by predict)."""
    steps = spec.transforms
    features = spec.input_features
    arrays, forward, inverse = [], [], []
    centers = 0
    for index, step in enumerate(steps):
        kind = step["kind"]
        guard = f"if (upto > {index}) "
        if kind == "affine":
            arrays.append(f"static const double transform{index}_scale[{features}] = {{ "
                          f"{', '.join(repr(float(v)) for v in step['scale'])} }};")
            arrays.append(f"static const double transform{index}_offset[{features}] = {{ "
                          f"{', '.join(repr(float(v)) for v in step['offset'])} }};")
            forward.append(f"    {guard}v = v * transform{index}_scale[f] + transform{index}_offset[f];"
                           f"  /* {index}: affine */")
            if step["output_scale"] is not None:
                arrays.append(f"static const double transform{index}_output_scale[{main_width}] = {{ "
                              f"{', '.join(repr(float(v)) for v in step['output_scale'])} }};")
                arrays.append(f"static const double transform{index}_output_offset[{main_width}] = {{ "
                              f"{', '.join(repr(float(v)) for v in step['output_offset'])} }};")
                inverse.append(f"    v = (v - transform{index}_output_offset[d]) / transform{index}_output_scale[d];"
                               f"  /* {index}: affine */")
        elif kind == "log":
            forward.append(f"    {guard}v = log(v);  /* {index}: log (the input must be > 0) */")
            if step["invert_output"]:
                inverse.append(f"    v = exp(v);  /* {index}: log */")
        else:
            forward.append(f"    {guard}v -= means[{centers * features} + f];  /* {index}: center */")
            if step["invert_output"]:
                arrays.append(f"static const size_t transform{index}_features[{main_width}] = {{ "
                              f"{', '.join(str(v) for v in step['output_features'])} }};")
                inverse.append(f"    v += means[{centers * features} + transform{index}_features[d]];"
                               f"  /* {index}: center */")
            centers += 1

    def function(signature: str, comment: str, lines: list[str], names: dict[str, str]) -> list[str]:
        unused = [f"    (void){arg};" for arg, used in names.items() if not any(used in line for line in lines)]
        return ["", comment, signature, "{", *unused, *lines, "    return v;", "}"]

    code = arrays + function(
        "static double transform_input(double v, size_t f, size_t upto, const double *means)",
        "/* The bundle's input transforms 0 .. upto-1 on one value of feature f, in double as the engine\n"
        "   does; means: the window means of each center step (predict only, else NULL). */",
        forward, {"f": "f]", "upto": "upto", "means": "means["}) + function(
        "static double transform_output(double v, size_t d, const double *means)",
        "/* Undo, in reverse order, the transforms that declare it, on main output feature d. */",
        inverse[::-1], {"d": "d]", "means": "means["})
    return [line for line in code if line is not None], centers


def _main_width(spec: ModelSpec, shapes) -> int:
    """Width of the output the transforms undo: for merge_mode=None, the forward half."""
    return output_shapes(spec, shapes, 1, 1)[0][-1]


def _main_count(spec: ModelSpec) -> int:
    """How many of predict's outputs are main outputs: 2 for Bidirectional merge_mode=None, else 1."""
    last = spec.layers[-1]
    return 2 if last.kind == "bidirectional" and last.config["merge_mode"] is None else 1


def _state_outputs(spec: ModelSpec, writer: _Writer) -> list[tuple[str, int]]:
    """(state field, units) of the final states predict returns after the main output(s)."""
    count = spec.output_count - _main_count(spec)
    last_fields = writer.fields[len(writer.fields) - len(writer.shapes[-1].state_dims):]
    return [(field, size) for field, size, _ in last_fields][:count]


def _self_check_c(spec: ModelSpec, writer: _Writer, prefix: str, tolerance: tuple[float, float]) -> list[str]:
    x = spec.self_check_input
    if x is None:
        return ["/* The bundle stored no self-check: returns -1. */",
                f"int {prefix}_self_check(float *max_error)", "{",
                "    if (max_error != NULL)", "        *max_error = 0.0f;", "    return -1;", "}"]
    batch, steps, _ = x.shape
    outputs = spec.self_check_outputs
    states = _state_outputs(spec, writer)
    mains = outputs[:_main_count(spec)]
    main = np.concatenate(mains, axis=-1).reshape(batch, -1)  # merge_mode=None: rows forward | backward
    lines = [c_array("float", "self_check_input", x, f"self-check input, (batch, time, {prefix.upper()}_INPUT_FEATURES)"),
             c_array("float", "self_check_output", main, "the source framework's main output for it, one row per sample")]
    compares = [f"        failed |= compare(out, self_check_output[s], {main.shape[1]}, &worst);"]
    if states:
        expected = np.concatenate([np.asarray(o, np.float32) for o in outputs[len(mains):]], axis=-1)
        lines.append(c_array("float", "self_check_state", expected, "and its final states (return_state)"))
        offset = 0
        for field, size in states:
            compares.append(f"        failed |= compare(state.{field}, self_check_state[s] + {offset}, {size}, &worst);")
            offset += size
    atol, rtol = tolerance
    streaming = ", 0" if writer.flow.streaming_read else ""
    lines += [
        "",
        f"/* Pass: |actual - expected| <= {atol:.3g} + {rtol:.3g} |expected| for every value. */",
        f"#define SELF_CHECK_ATOL {float_literal(atol)}",
        f"#define SELF_CHECK_RTOL {float_literal(rtol)}",
        f"#define SELF_CHECK_WORK_FLOATS {writer.work_floats(steps)}",
        "",
        "/* 1 if some actual[i] is beyond tolerance of expected[i]; *worst tracks the largest difference. */",
        "static int compare(const float *actual, const float *expected, size_t n, float *worst)",
        "{",
        "    int failed = 0;",
        "    size_t i;",
        "    for (i = 0; i < n; i++) {",
        "        const float difference = fabsf(actual[i] - expected[i]);",
        "        if (!(difference <= *worst))  /* NaN too */",
        "            *worst = difference;",
        "        if (!(difference <= SELF_CHECK_ATOL + SELF_CHECK_RTOL * fabsf(expected[i])))",
        "            failed = 1;",
        "    }",
        "    return failed;",
        "}",
        "",
        f"int {prefix}_self_check(float *max_error)",
        "{",
        "    float work[SELF_CHECK_WORK_FLOATS];",
        f"    {prefix}_state state;",
        "    const float *out;",
        "    float worst = 0.0f;",
        "    int failed = 0;",
        "    size_t s;",
        f"    for (s = 0; s < {batch}; s++) {{",
        f"        {prefix}_reset(&state);",
        "        memcpy(work, self_check_input[s], sizeof self_check_input[s]);",
        f"        out = network(&state, work, {steps}{streaming});",
        *compares,
        "    }",
        "    if (max_error != NULL)",
        "        *max_error = worst;",
        "    return failed;",
        "}",
    ]
    return lines


def _network_c(writer: _Writer, prefix: str) -> list[str]:
    width = "SEQUENCE_WIDTH"
    buffers = [("a", f"steps * {width}", f"(steps, {width}): the sequence, in and out of the layers"),
               ("b", f"steps * {width}", f"(steps, {width})")]
    if writer.back_units:
        buffers.append(("back", "steps * BACKWARD_UNITS", "(steps, BACKWARD_UNITS): a Bidirectional's backward half"))
    if writer.masking:
        buffers.append(("mask", "steps", "(steps): 1 keep, 0 skip (Masking)"))
    buffers.append(("scratch", None, "(SCRATCH_FLOATS): a GRU's gates"))
    lines = []
    previous = None
    for name, size, comment in buffers:
        start = "work" if previous is None else f"{previous[0]} + {previous[1]}"
        lines.append(f"    float *{name} = {start};  /* {comment} */")
        previous = (name, size)
    streaming = ", int streaming" if writer.flow.streaming_read else ""
    return [
        f"#define SEQUENCE_WIDTH {writer.max_width}  /* widest row of any layer's input or output */",
        *([f"#define BACKWARD_UNITS {writer.back_units}"] if writer.back_units else []),
        f"#define SCRATCH_FLOATS {writer.scratch_floats}",
        "",
        "/* The layers in order on the sequence at the start of work (steps rows of the input features);",
        "   returns the buffer holding the last layer's output."
        + (" streaming: 0 in predict, 1 in step. */" if streaming else " */"),
        f"static const float *network({prefix}_state *state, float *work, size_t steps{streaming})",
        "{",
        *lines,
        "    size_t rows = steps;  /* rows the sequence holds: 1 after return_sequences=False */",
        *writer.body,
        f"    return {writer.flow.current};",
        "}",
    ]


def _api_c(spec: ModelSpec, writer: _Writer, prefix: str, centers: int, main_width: int,
           output_is_sequence: bool, can_stream: bool) -> list[str]:
    features = spec.input_features
    upper = prefix.upper()
    width = f"{upper}_OUTPUT_FEATURES"
    rows = "steps" if output_is_sequence else None
    transforms = bool(spec.transforms)
    count = len(spec.transforms)
    predict_flag = ", 0" if writer.flow.streaming_read else ""
    step_flag = ", 1" if writer.flow.streaming_read else ""
    means = "means" if centers else "NULL"

    def outputs(rows_expr: str) -> list[str]:
        count = f"{rows_expr} * {width}" if rows_expr else width
        if not transforms:
            return [f"    memcpy(y, out, {count} * sizeof *y);"]
        rows_expr = rows_expr or "1"
        return [f"    for (t = 0; t < {rows_expr}; t++)",
                f"        for (d = 0; d < {width}; d++)",
                f"            y[t * {width} + d] = d < {main_width} "
                f"? (float)transform_output((double)out[t * {width} + d], d, {means}) : out[t * {width} + d];"]

    lines = [
        f"void {prefix}_reset({prefix}_state *state)",
        "{",
        "    memset(state, 0, sizeof *state);",
        "}",
        "",
        f"size_t {prefix}_work_floats(size_t steps)",
        "{",
        f"    const size_t per_step = {writer.per_step_floats()};",
        "    if (steps > (SIZE_MAX - SCRATCH_FLOATS) / per_step)",
        "        return 0;",
        "    return steps * per_step + SCRATCH_FLOATS;",
        "}",
        "",
        f"void {prefix}_predict_from({prefix}_state *state, const float *x, size_t steps, float *y, float *work)",
        "{",
        "    const float *out;",
    ]
    if transforms:
        lines.append("    size_t t, f, d;")
        if centers:
            lines.append(f"    double means[{centers * features}];  /* per center step, per feature */")
            center_indices = [i for i, step in enumerate(spec.transforms) if step["kind"] == "center"]
            lines += ["    double sum;"]
            for k, index in enumerate(center_indices):
                lines += [f"    for (f = 0; f < {features}; f++) {{  /* transform {index}: the window's mean */",
                          "        sum = 0.0;",
                          "        for (t = 0; t < steps; t++)",
                          f"            sum += transform_input((double)x[t * {features} + f], f, {index}, means);",
                          f"        means[{k * features} + f] = sum / (double)steps;",
                          "    }"]
        lines += ["    for (t = 0; t < steps; t++)",
                  f"        for (f = 0; f < {features}; f++)",
                  f"            work[t * {features} + f] = (float)transform_input((double)x[t * {features} + f], f, "
                  f"{count}, {means});"]
    else:
        lines.append(f"    memcpy(work, x, steps * {upper}_INPUT_FEATURES * sizeof *work);")
    lines += [f"    out = network(state, work, steps{predict_flag});", *outputs(rows), "}", "",
              f"void {prefix}_predict(const float *x, size_t steps, float *y, float *work)",
              "{",
              f"    {prefix}_state state;",
              f"    {prefix}_reset(&state);",
              f"    {prefix}_predict_from(&state, x, steps, y, work);",
              "}"]
    if can_stream:
        lines += ["", f"#define STEP_WORK_FLOATS {writer.work_floats(1)}", "",
                  f"void {prefix}_step({prefix}_state *state, const float *x, float *y)",
                  "{",
                  "    float work[STEP_WORK_FLOATS];",
                  "    const float *out;"]
        if transforms:
            lines += ["    size_t t = 0, f, d;",
                      f"    for (f = 0; f < {features}; f++)",
                      f"        work[f] = (float)transform_input((double)x[f], f, {count}, NULL);"]
        else:
            lines.append(f"    memcpy(work, x, {upper}_INPUT_FEATURES * sizeof *work);")
        lines += [f"    out = network(state, work, 1{step_flag});", *outputs(None), "}"]
    return lines


def _header(spec: ModelSpec, writer: _Writer, prefix: str, comment: str, output_is_sequence: bool,
            can_stream: bool, stream_note: str) -> str:
    upper = prefix.upper()
    guard = f"{upper}_H_INCLUDED"
    output_dim = writer.shapes[-1].output_dim
    split = ""
    if _main_count(spec) == 2:
        units = writer.shapes[-1].state_dims
        split = f"; merge_mode=None: columns 0..{units[0] - 1} forward, then {units[1]} backward"
    fields = "\n".join(f"    float {name}[{size}];  /* {text} */" for name, size, text in writer.fields)
    state_note = ""
    states = _state_outputs(spec, writer)
    if states:
        state_note = ("\n * The final states Keras returns with return_state are the fields "
                      + ", ".join(field for field, _ in states) + " after predict_from or step.")
    step = ""
    if can_stream:
        step = (f"\n/* Feed one time step x[{upper}_INPUT_FEATURES]; y[{upper}_OUTPUT_FEATURES] = what Stream.step\n"
                f"   returns: predict on everything fed since the last reset. No allocation, no work buffer. */\n"
                f"void {prefix}_step({prefix}_state *state, const float *x, float *y);\n")
    rows = "steps" if output_is_sequence else "1"
    return f"""{comment}
#ifndef {guard}
#define {guard}

#include <stddef.h>

#ifdef __cplusplus
extern "C" {{
#endif

#define {upper}_INPUT_FEATURES {spec.input_features}  /* F: features per time step */
#define {upper}_OUTPUT_FEATURES {output_dim}  /* D: features per step of the main output{split} */
#define {upper}_OUTPUT_IS_SEQUENCE {int(output_is_sequence)}  /* 1: predict returns one row of D per time step, 0: one row */
#define {upper}_CAN_STREAM {int(can_stream)}  /* 1: {prefix}_step exists{stream_note} */

/* Everything a sequence carries from step to step: one carry per GRU direction. Plain data:
 * memcpy saves and restores it, and instances are independent.{state_note} */
struct {prefix}_state {{
{fields}
}};
typedef struct {prefix}_state {prefix}_state;

/* Zero the state, like Stream.reset(). */
void {prefix}_reset({prefix}_state *state);
{step}
/* Floats of work buffer {prefix}_predict needs for `steps` time steps (0: too many steps for size_t). */
size_t {prefix}_work_floats(size_t steps);

/* y = Model.predict(x[None])[0]: x[steps * F] row-major (time, feature), from zero state;
   y[{rows} * D]; work[{prefix}_work_floats(steps)]. The inputs must be finite (and > 0 where the
   bundle takes a log); nothing is checked here. */
void {prefix}_predict(const float *x, size_t steps, float *y, float *work);

/* {prefix}_predict from the carries in *state (Keras initial_state), leaving the final carries there. */
void {prefix}_predict_from({prefix}_state *state, const float *x, size_t steps, float *y, float *work);

/* Replay the self-check stored with the model: 0 pass, 1 fail, -1 none stored.
   *max_error (may be NULL): the largest absolute difference found. */
int {prefix}_self_check(float *max_error);

#ifdef __cplusplus
}}
#endif

#endif
"""


@dataclasses.dataclass
class CCode:
    header: str
    source: str
    report: dict


def build_c(spec: ModelSpec, name: str = "model", weights: str = "float32", origin: str | None = None,
            tolerance: tuple[float, float] = (PARITY_ATOL, PARITY_RTOL)) -> CCode:
    """The two files' text for a spec (validated here); ``tolerance``: the self-check's (atol, rtol)."""
    from gru_engine import transforms as transform_steps
    from gru_engine.spec import backward_layers

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
    writer = _Writer(spec, shapes, weights)
    writer.generate()
    main_width = _main_width(spec, shapes)
    transform_lines, centers = _transforms_c(spec, main_width) if spec.transforms else ([], 0)
    backward = backward_layers(spec)
    can_stream = not backward and transform_steps.streamable(spec.transforms)
    if backward:
        stream_note = f" (0: layer '{backward[0]}' reads the sequence backwards)"
    elif not can_stream:
        stream_note = " (0: the bundle centers each window on its mean)"
    else:
        stream_note = ""
    output_is_sequence = shapes[-1].output_is_sequence
    comment = _header_comment(spec, name, weights, origin or "a model description")
    core = CORE_C % {"matrix_fields": MATRIX_FIELDS[weights],
                     "matvec": MATVEC_FLOAT if weights == "float32" else MATVEC_INT8}
    network = _network_c(writer, name)
    parts = [comment.replace(f"/* {name}:", f"/* {name}.c:", 1) + "\n",
             f'#include "{name}.h"', "", "#include <math.h>", "#include <stdint.h>", "#include <string.h>",
             core.rstrip(), *[FAMILIES[kind].c_source.rstrip() for kind in writer.families], "",
             "/* ----- weights ----- */", "", "\n\n".join(writer.arrays), "", "\n\n".join(writer.tables),
             *transform_lines, "", *network, "", "/* ----- public API ----- */", "",
             *_api_c(spec, writer, name, centers, main_width, output_is_sequence, can_stream), "",
             *_self_check_c(spec, writer, name, tolerance), ""]
    source = "\n".join(parts)
    header = _header(spec, writer, name, comment.replace(f"/* {name}:", f"/* {name}.h:", 1), output_is_sequence,
                     can_stream, stream_note)
    check_steps = spec.self_check_input.shape[1] if spec.self_check_input is not None else 1
    report = {"weights": weights, "weight_bytes": writer.weight_bytes,
              "state_bytes": 4 * sum(size for _, size, _ in writer.fields),
              "work_floats_steps": check_steps, "work_floats": writer.work_floats(check_steps),
              "can_stream": can_stream}
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
    directory = _check_directory(out_dir)
    spec, origin = resolve_model(model)
    tolerance = (PARITY_ATOL, PARITY_RTOL)
    deviation = None
    if weights == "int8":
        build_c(spec, name, weights, origin)  # refuse what C cannot express before measuring
        deviation = int8_deviation(spec)
        tolerance = (PARITY_ATOL + INT8_MARGIN * deviation.get("self_check_vs_stored", 0.0), PARITY_RTOL)
    code = build_c(spec, name, weights, origin, tolerance)
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
