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

from gru_engine.spec import Layer, LayerShape

from .c_frontends import FRONTEND_EMITTERS, FRONTEND_SOURCES
from .c_recurrent import ACTIVATION_CODES, bidirectional, bidirectional_sources, c_sources, recurrent


# ----- the helpers every family calls: a weight matrix, matvec, activations -----

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

/* tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (error 1.4e-7; float32 tanhf: about 1e-7): the
   polynomials in double because recurrences amplify rounding, the divide in float (a double divide
   has a third of the throughput), clamped to [-1, 1]. The engine's float32 formula (one exponential,
   a polynomial near 0; 9.1e-8) differs from it by less than 2e-7, but its select between the two
   stays scalar under compilers' default strict IEEE flags, where this form vectorises. */
static inline float tanh_approx(float v)
{
    const double x = (double)clamp_magnitude(v, 9.0f);
    const double x2 = x * x;
    const double p = ((((-1.03821162e-11 * x2 + 2.78178600e-08) * x2 + 2.67446258e-05) * x2 + 3.80222599e-03) * x2
                      + 1.36261799e-01) * x2 + 9.99999908e-01;
    const double q = (((1.20278291e-06 * x2 + 3.82464926e-04) * x2 + 2.70007688e-02) * x2 + 4.69594857e-01) * x2
                     + 1.0;
    return clamp_magnitude((float)(x * p) / (float)q, 1.0f);
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

MATVEC_FLOAT = """/* acc[j] += sum_i v[i] * m[i][first + j] for j < count, in the axpy form: for each row i, add
   v[i] times the row. Compilers vectorise that over j under strict IEEE flags, which they cannot
   do for a dot product per output (a float reduction). Eight rows per pass keep each acc[j] in a
   register across them: an eighth of the loads and stores of acc. */
static void matvec_acc(float *RESTRICT acc, const float *RESTRICT v, size_t rows, const Matrix *m, size_t first,
                       size_t count)
{
    const size_t cols = m->cols;
    const float *RESTRICT w = m->values + first;  /* row i of the columns used */
    size_t i = 0, j;
    for (; i + 8 <= rows; i += 8, w += 8 * cols) {
        const float v0 = v[i], v1 = v[i + 1], v2 = v[i + 2], v3 = v[i + 3];
        const float v4 = v[i + 4], v5 = v[i + 5], v6 = v[i + 6], v7 = v[i + 7];
        for (j = 0; j < count; j++)
            acc[j] += ((v0 * w[j] + v1 * w[cols + j]) + (v2 * w[2 * cols + j] + v3 * w[3 * cols + j]))
                      + ((v4 * w[4 * cols + j] + v5 * w[5 * cols + j]) + (v6 * w[6 * cols + j] + v7 * w[7 * cols + j]));
    }
    for (; i < rows; i++, w += cols) {
        const float vi = v[i];
        for (j = 0; j < count; j++)
            acc[j] += vi * w[j];
    }
}"""

MATVEC_INT8 = """/* acc[j] += scale[first + j] * sum_i v[i] * m[i][first + j] for j < count: the int8 products are
   summed in float over a block of columns, then scaled once per column. */
#define MATVEC_BLOCK 32
static void matvec_acc(float *RESTRICT acc, const float *RESTRICT v, size_t rows, const Matrix *m, size_t first,
                       size_t count)
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
