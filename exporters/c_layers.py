"""The C writer's layer families: one entry per layer kind in ``FAMILIES``, each one C function
plus the Python that declares a layer's weights and state and emits its call in the network's
body. Here: the helpers every family calls, Masking and Dense; the recurrent kinds (GRU, LSTM,
SimpleRNN, Bidirectional) are in ``c_recurrent``, the front-end kinds (Conv1D, pooling,
BatchNormalization) in ``c_frontends``.

Adding a layer kind is one ``Family``: its C (types and one function; ``c_sources`` lists the
parts a layer needs, each emitted once) and an ``emit(writer, index, layer, shape)`` that declares the layer's
weights with ``writer.matrix`` (a ``*kernel`` tensor: int8 when asked) / ``writer.vector``
(biases, always float32), its carries with ``writer.state_field``, its
scratch and buffer needs, and appends its call with ``writer.call``. ``writer.flow`` tracks, at
generation time, which buffer holds the current sequence, its width and whether a mask applies.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gru_engine.kernels import activations
from gru_engine.spec import Layer, LayerShape

from .c_api import float_literal
from .c_frontends import FRONTEND_EMITTERS, FRONTEND_SOURCES
from .c_recurrent import ACTIVATION_CODES, bidirectional, bidirectional_sources, c_sources, recurrent


# ----- the helpers every family calls: a weight matrix, matvec, activations -----

def _horner(coefficients, variable: str) -> str:
    """c0 + v (c1 + v (c2 + ...)) as C float arithmetic, the highest power innermost."""
    text = float_literal(coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        sign = "-" if coefficient < 0 else "+"
        text = f"({text} * {variable} {sign} {float_literal(abs(coefficient))})"
    return text


# The engine's activation constants, written into CORE_C: one source for both.
ACTIVATION_CONSTANTS = {
    "log2e": float_literal(activations.LOG2E), "ln2_high": float_literal(activations.LN2_HIGH),
    "ln2_low": float_literal(activations.LN2_LOW), "tanh_clamp": float_literal(activations.TANH_CLAMP),
    "sigmoid_clamp": float_literal(activations.SIGMOID_CLAMP), "small_tanh": float_literal(activations.SMALL_TANH),
    "exp_poly": _horner((activations.E0, activations.E1, activations.E2, activations.E3, activations.E4,
                         activations.E5, activations.E6), "r"),
    "tanh_poly": _horner((activations.T1, activations.T2, activations.T3, activations.T4, activations.T5,
                          activations.T6), "a2"),
}

CORE_C = """
/* restrict: the products' output never overlaps their inputs. C++ has no restrict keyword. */
#if !defined(__cplusplus)
#define RESTRICT restrict
#elif defined(__GNUC__) || defined(_MSC_VER)
#define RESTRICT __restrict
#else
#define RESTRICT
#endif

/* Weights start on a 64-byte boundary, a cache line: a 512-bit load that straddles two lines
   costs two (measured, GRU(50) step: 2.1 us with the weights 32 bytes off a line, 1.4 us on one). */
#if defined(__GNUC__)
#define ALIGNED __attribute__((aligned(64)))
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define ALIGNED _Alignas(64)
#else
#define ALIGNED
#endif

/* A row-major weight matrix; `cols` floats (int8: bytes) per row. A recurrent layer's rows are
   padded with zero columns to a multiple of 16, so that its products over whole rows run in whole
   vectors. */
typedef struct {
%(matrix_fields)s
} Matrix;

%(matvec)s

/* row[n] = bias, or zeros where the layer has none (Keras use_bias=False). */
static void start_from(float *row, const float *bias, size_t n)
{
    if (bias != NULL)
        memcpy(row, bias, n * sizeof *row);
    else
        memset(row, 0, n * sizeof *row);
}

/* v clamped to [-limit, limit], exactly. Written as the sign of v on min(|v|, limit): compilers
   vectorise that form under the default strict IEEE flags (-ftrapping-math), where they keep a
   two-sided clamp (v > limit ? limit : v < -limit ? -limit : v) scalar. */
static inline float clamp_magnitude(float v, float limit)
{
    const float magnitude = fabsf(v);
    return copysignf(magnitude > limit ? limit : magnitude, v);
}

/* tanh and sigmoid as the engine computes them (gru_engine.kernels.activations, the same
   constants), in float only, from one exponential of a non-positive argument: within 9.1e-8 of
   exact (float32 tanhf: about 1e-7). No double: a Cortex-M4F's FPU has none, and would emulate it.
   Written without selects that a compiler could turn into branches (which stop it vectorising under
   the default strict IEEE flags): the clamps are integer minimums, the choices bit masks. */
static inline float exp_nonpositive(float y)  /* e^y for y in [-30, 0] */
{
    const int32_t n = (int32_t)(y * %(log2e)s - 0.5f);  /* round(y / ln2): y <= 0, the cast truncates */
    const float whole = (float)n;
    const float r = (y - whole * %(ln2_high)s) - whole * %(ln2_low)s;  /* |r| <= ln2 / 2 */
    const float poly = %(exp_poly)s;
    const uint32_t bits = (uint32_t)(n + 127) << 23;  /* 2^n: n + 127 is its biased exponent */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return poly * scale;
}

/* min(magnitude, limit) for magnitude >= 0: non-negative floats order as their bits do as integers,
   and an integer minimum stays branch-free where a float one (NaN rules) may not. */
static inline float at_most(float magnitude, float limit)
{
    int32_t a, b, least;
    float result;
    memcpy(&a, &magnitude, sizeof a);
    memcpy(&b, &limit, sizeof b);
    least = a < b ? a : b;
    memcpy(&result, &least, sizeof result);
    return result;
}

/* condition ? when_true : when_false, by bits, both computed first. A float blend
   (c * a + (1 - c) * b) let GCC move each product under a branch, which only CPUs with masked
   vector operations (AVX-512) could vectorise again: on AVX2 the activations stayed scalar, 58%% of
   an airline step. */
static inline float choose(int condition, float when_true, float when_false)
{
    const uint32_t all_ones_when_true = (uint32_t)0 - (uint32_t)condition;
    uint32_t a, b, bits;
    float result;
    memcpy(&a, &when_true, sizeof a);
    memcpy(&b, &when_false, sizeof b);
    bits = (a & all_ones_when_true) | (b & ~all_ones_when_true);
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline float tanh_approx(float v)
{
    const float a = at_most(fabsf(v), %(tanh_clamp)s);  /* beyond, tanh is +-1 in float */
    const float e = exp_nonpositive(-2.0f * a);
    const float a2 = a * a;
    const float small = a + a * a2 * %(tanh_poly)s;  /* near 0, where 1 - e would cancel */
    const float large = (1.0f - e) / (1.0f + e);
    return copysignf(choose(a < %(small_tanh)s, small, large), v);
}

static inline float sigmoid_approx(float v)
{
    const float e = exp_nonpositive(-at_most(fabsf(v), %(sigmoid_clamp)s));
    /* 1 / (1 + e), or e / (1 + e) for v < 0 (no cancellation) */
    return choose(v >= 0.0f, 1.0f, e) / (1.0f + e);
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
    case ACT_SIGMOID:
        for (j = 0; j < n; j++)
            v[j] = sigmoid_approx(v[j]);
        break;
    case ACT_HARD_SIGMOID:  /* Keras 3: clip(x / 6 + 0.5, 0, 1) (tf.keras 2 used 0.2 x + 0.5) */
        for (j = 0; j < n; j++)
            v[j] = clamp_magnitude(v[j] * (1.0f / 6.0f), 0.5f) + 0.5f;
        break;
    case ACT_RELU:
        for (j = 0; j < n; j++)
            v[j] = 0.5f * (v[j] + fabsf(v[j]));  /* max(v, 0), exact */
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

MATVEC_TEMPLATE = """/* acc[j] += %(sum)s for j < count, in the axpy form: for each row i, add
   v[i] times the row. Compilers vectorise that over j under strict IEEE flags, which they cannot
   do for a dot product per output (a float reduction). Eight rows per pass keep each acc[j] in a
   register across them: an eighth of the loads and stores of acc%(why_scale)s. */
static void matvec_acc(float *RESTRICT acc, const float *RESTRICT v, size_t rows, const Matrix *m, size_t first,
                       size_t count)
{
    const size_t cols = m->cols;
    const %(type)s *RESTRICT w = m->values + first;  /* row i of the columns used */%(scale_line)s
    size_t i = 0, j;
    for (; i + 8 <= rows; i += 8, w += 8 * cols) {
        const float v0 = v[i], v1 = v[i + 1], v2 = v[i + 2], v3 = v[i + 3];
        const float v4 = v[i + 4], v5 = v[i + 5], v6 = v[i + 6], v7 = v[i + 7];
        for (j = 0; j < count; j++) {
            const float eight_rows = ((v0 * %(w0)s + v1 * %(w1)s) + (v2 * %(w2)s + v3 * %(w3)s))
                                     + ((v4 * %(w4)s + v5 * %(w5)s) + (v6 * %(w6)s + v7 * %(w7)s));
            acc[j] += %(scaled)seight_rows;
        }
    }
    for (; i < rows; i++, w += cols) {
        const float vi = v[i];
        for (j = 0; j < count; j++)
            acc[j] += %(scaled)svi * %(w0)s;
    }
}"""


def matvec_source(weights: str) -> str:
    """matvec_acc for float32 or int8 weights: one loop, the int8 one reading each weight as a float
    and scaling each column's sum over eight rows once (per-column scales, so they cannot go first)."""
    int8 = weights == "int8"
    offsets = ["j"] + [f"{k} * cols + j" if k > 1 else "cols + j" for k in range(1, 8)]
    read = "(float)w[%s]" if int8 else "w[%s]"
    fields = {f"w{k}": read % offset for k, offset in enumerate(offsets)}
    return MATVEC_TEMPLATE % dict(
        fields, type="int8_t" if int8 else "float",
        sum="scale[first + j] * sum_i v[i] * m[i][first + j]" if int8 else "sum_i v[i] * m[i][first + j]",
        why_scale=", and of the column scales" if int8 else "",
        scale_line="\n    const float *RESTRICT scale = m->scale + first;" if int8 else "",
        scaled="scale[j] * " if int8 else "")


MATRIX_FIELDS = {
    "float32": "    const float *values;\n    size_t cols;",
    "int8": "    const int8_t *values;\n    const float *scale;   /* (cols): float value = int8 value * scale of its column */\n"
            "    size_t cols;",
}


@dataclasses.dataclass(frozen=True)
class Family:
    c_sources: Callable[[Layer], tuple[str, ...]]  # the C a layer needs, shared parts first; each emitted once
    emit: Callable[..., None]                      # (writer, index, layer, shape) -> None


MASKING_C = """
/* Keras Masking: a step whose features all equal mask_value is skipped by the recurrent layers
   after it (mask[t] = 0), and its features are zeroed, as Keras multiplies them by the mask. */
static void masking_run(float *x, size_t rows, size_t features, float mask_value, float *mask)
{
    size_t t, f;
    for (t = 0; t < rows; t++) {
        float *row = x + t * features;
        int keep = 0;
        for (f = 0; f < features; f++)
            keep |= row[f] != mask_value;
        mask[t] = keep ? 1.0f : 0.0f;
        if (!keep)
            memset(row, 0, features * sizeof *row);
    }
}
"""


def _masking(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    flow = writer.flow
    writer.uses_mask()
    writer.call(index, layer, "Masking",
                [f"masking_run({flow.current}, rows, {shape.input_dim}, "
                 f"{writer.float_literal(layer.config['mask_value'])}, mask);"])
    flow.masked = True


DENSE_C = """
/* Keras Dense, applied to each row: y = activation(x kernel + bias). */
typedef struct {
    size_t input_dim, units;
    Matrix kernel;          /* (input_dim, units) */
    const float *bias;      /* (units), NULL: use_bias=False */
    int activation;
} DenseLayer;

static void dense_run(const DenseLayer *layer, const float *x, size_t rows, float *y)
{
    size_t t;
    for (t = 0; t < rows; t++) {
        float *row = y + t * layer->units;
        start_from(row, layer->bias, layer->units);
        matvec_acc(row, x + t * layer->input_dim, layer->input_dim, &layer->kernel, 0, layer->units);
        activate(row, layer->units, layer->activation);
    }
}
"""


def _dense(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    ident = writer.ident(index, layer)
    kernel = writer.matrix(f"{ident}_kernel", layer.weights["kernel"],
                           f"layer '{layer.name}' kernel: (input_dim, units)")
    bias = writer.bias(f"{ident}_bias", layer.weights.get("bias"), f"layer '{layer.name}' bias: (units)")
    table = f"{ident}_layer"
    writer.table(f"static const DenseLayer {table} = {{ {shape.input_dim}, {config['units']}, {kernel}, {bias}, "
                 f"{ACTIVATION_CODES[config['activation']]} }};")
    flow = writer.flow
    source, target = flow.current, flow.swap()
    writer.call(index, layer, f"Dense, {config['units']} units, {config['activation']}",
                [f"dense_run(&{table}, {source}, rows, {target});"])


FAMILIES: dict[str, Family] = {
    "masking": Family(lambda layer: (MASKING_C,), _masking),
    "gru": Family(lambda layer: c_sources("gru"), recurrent),
    "lstm": Family(lambda layer: c_sources("lstm"), recurrent),
    "simple_rnn": Family(lambda layer: c_sources("simple_rnn"), recurrent),
    "bidirectional": Family(bidirectional_sources, bidirectional),
    "dense": Family(lambda layer: (DENSE_C,), _dense),
    **{kind: Family(lambda layer: FRONTEND_SOURCES[layer.kind], emit) for kind, emit in FRONTEND_EMITTERS.items()},
}
