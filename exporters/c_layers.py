"""The C writer's layer families: one entry per layer kind, each one C function plus the Python
that declares a layer's weights and state and emits its call in the network's body.

Adding a layer kind is one ``Family`` here: its C source (types and one function, emitted once
when a model uses the kind) and an ``emit(writer, index, layer, shape)`` that declares the layer's
weights with ``writer.matrix`` / ``writer.vector``, its carries with ``writer.state_field``, its
scratch and buffer needs, and appends its call with ``writer.call``. ``writer.flow`` tracks, at
generation time, which buffer holds the current sequence, its width, whether it is still a
sequence and whether a mask applies to it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gru_engine.spec import Layer, LayerShape

ACTIVATION_CODES = {"linear": "ACT_LINEAR", "tanh": "ACT_TANH", "sigmoid": "ACT_SIGMOID",
                    "hard_sigmoid": "ACT_HARD_SIGMOID", "relu": "ACT_RELU", "softmax": "ACT_SOFTMAX"}
MERGE_CODES = {"concat": "MERGE_CONCAT", None: "MERGE_CONCAT", "sum": "MERGE_SUM", "mul": "MERGE_MUL",
               "ave": "MERGE_AVE"}


# ----- the helpers every family calls: a weight matrix, matvec, activations -----

CORE_C = """
/* A row-major weight matrix; `cols` floats (int8: bytes) per row. */
typedef struct {
%(matrix_fields)s
} Matrix;

%(matvec)s

/* tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9, the engine's approximation (error 1.4e-7; float32
   tanhf: about 1e-7), evaluated in double because recurrences amplify rounding. The clamps are
   written with fabs, not comparisons: under the default strict IEEE flags (-ftrapping-math) a
   comparison keeps the loop around it from vectorising, and these clamps are exact in double. */
static inline float tanh_approx(float v)
{
    const double c = (double)v;
    const double x = 0.5 * (fabs(c + 9.0) - fabs(c - 9.0));  /* clamp to [-9, 9] */
    const double x2 = x * x;
    const double p = ((((-1.03821162e-11 * x2 + 2.78178600e-08) * x2 + 2.67446258e-05) * x2 + 3.80222599e-03) * x2
                      + 1.36261799e-01) * x2 + 9.99999908e-01;
    const double q = (((1.20278291e-06 * x2 + 3.82464926e-04) * x2 + 2.70007688e-02) * x2 + 4.69594857e-01) * x2
                     + 1.0;
    const double y = x * p / q;
    return (float)(0.5 * (fabs(y + 1.0) - fabs(y - 1.0)));  /* clamp to [-1, 1] */
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
            const double s = (double)(v[j] * (1.0f / 6.0f) + 0.5f);
            v[j] = (float)(0.5 * (fabs(s) - fabs(s - 1.0)) + 0.5);  /* clamp to [0, 1], exact */
        }
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


@dataclasses.dataclass(frozen=True)
class Family:
    c_source: str                       # C types and the family's function, emitted once
    emit: Callable[..., None]           # (writer, index, layer, shape) -> None
    needs: tuple[str, ...] = ()         # families whose C source this one calls


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


GRU_C = """
/* What a GRU emits at a masked (skipped) step: zeros (Keras zero_output_for_mask=True), its previous
   output in this call, zeros before its first unmasked step (Keras predict), or the carry (a stream,
   so that each step equals predict on everything fed so far). */
enum { MASKED_ZERO, MASKED_PREVIOUS, MASKED_CARRY };

/* One direction of a Keras GRU, gates z | r | h as in Keras's weight columns:
     z  = recurrent_activation(x W_z + h U_z + b_z)
     r  = recurrent_activation(x W_r + h U_r + b_r)
     reset_after=1: hh = activation(x W_h + b_h + r * (h U_h + rb_h))
     reset_after=0: hh = activation(x W_h + b_h + (r * h) U_h)
     h' = z * h + (1 - z) * hh                                                             */
typedef struct {
    size_t input_dim, units;
    Matrix kernel;                 /* W: (input_dim, 3 * units) */
    Matrix recurrent_kernel;       /* U: (units, 3 * units) */
    const float *input_bias;       /* (3 * units): b; z and r also hold their recurrent bias; NULL: use_bias=False */
    const float *recurrent_bias;   /* (units): rb_h, reset_after=True with use_bias only, else NULL */
    int activation, recurrent_activation;
    int reset_after;               /* Keras reset_after */
    int go_backwards;              /* Keras go_backwards: steps run from the last to the first */
} GruLayer;

/* Run `steps` steps of x (steps, input_dim) from the carry h (units), updated in place. The output
   after processing step s goes to out + s * out_stride (Keras returns go_backwards outputs in
   processing order), or, with time_ordered (a Bidirectional's backward half), to the row of its
   time step. mask (steps) or NULL; scratch: 7 * units floats. */
static void gru_run(const GruLayer *layer, const float *x, size_t steps, const float *mask, int masked_output,
                    float *h, float *out, size_t out_stride, int time_ordered, float *scratch)
{
    const size_t units = layer->units, two = 2 * units, three = 3 * units;
    float *gx = scratch;               /* (3H) x W + b, then the gates z | r | hh */
    float *gh = scratch + three;       /* (3H) h U (+ rb_h) */
    float *rh = scratch + 2 * three;   /* (H)  r * h, for reset_after=False */
    int emitted = masked_output == MASKED_CARRY;
    size_t s, j;
    for (s = 0; s < steps; s++) {
        const size_t t = layer->go_backwards ? steps - 1 - s : s;
        float *o = out + (time_ordered ? t : s) * out_stride;
        if (mask != NULL && mask[t] == 0.0f) {
            /* Keras skips a masked step: the carry passes through unchanged. */
            for (j = 0; j < units; j++)
                o[j] = emitted ? h[j] : 0.0f;
            continue;
        }
        if (masked_output != MASKED_ZERO)
            emitted = 1;
        if (layer->input_bias != NULL)
            memcpy(gx, layer->input_bias, three * sizeof *gx);
        else
            memset(gx, 0, three * sizeof *gx);
        matvec_acc(gx, x + t * layer->input_dim, layer->input_dim, &layer->kernel, 0, three);
        if (layer->reset_after) {
            memset(gh, 0, two * sizeof *gh);
            if (layer->recurrent_bias != NULL)
                memcpy(gh + two, layer->recurrent_bias, units * sizeof *gh);
            else
                memset(gh + two, 0, units * sizeof *gh);
            matvec_acc(gh, h, units, &layer->recurrent_kernel, 0, three);
            for (j = 0; j < two; j++)
                gx[j] += gh[j];
            activate(gx, two, layer->recurrent_activation);
            for (j = 0; j < units; j++)
                gx[two + j] += gx[units + j] * gh[two + j];
        } else {
            memset(gh, 0, two * sizeof *gh);
            matvec_acc(gh, h, units, &layer->recurrent_kernel, 0, two);
            for (j = 0; j < two; j++)
                gx[j] += gh[j];
            activate(gx, two, layer->recurrent_activation);
            for (j = 0; j < units; j++)
                rh[j] = gx[units + j] * h[j];
            matvec_acc(gx + two, rh, units, &layer->recurrent_kernel, two, units);
        }
        activate(gx + two, units, layer->activation);
        for (j = 0; j < units; j++) {
            h[j] = gx[j] * h[j] + (1.0f - gx[j]) * gx[two + j];
            o[j] = h[j];
        }
    }
}
"""


def gru_table(writer, ident: str, config: dict, weights: dict, prefix: str, input_dim: int, what: str) -> str:
    """Declare one GRU direction's weights and its GruLayer; return the layer's C name."""
    import numpy as np

    units = config["units"]
    kernel = writer.matrix(f"{ident}_kernel", weights[prefix + "kernel"],
                           f"{what} kernel W: (input_dim, 3 * units), columns z | r | h")
    recurrent = writer.matrix(f"{ident}_recurrent_kernel", weights[prefix + "recurrent_kernel"],
                              f"{what} recurrent_kernel U: (units, 3 * units), columns z | r | h")
    input_bias = recurrent_bias = "NULL"
    bias = weights.get(prefix + "bias")
    if bias is not None and config["reset_after"]:
        # z and r add both biases to one sum: folded into one vector, as the engine does.
        two = 2 * units
        folded = np.concatenate([bias[0, :two] + bias[1, :two], bias[0, two:]]).astype(np.float32)
        input_bias = writer.vector(f"{ident}_input_bias", folded,
                                   f"{what} bias[0] with bias[1] added to z | r: (3 * units)")
        recurrent_bias = writer.vector(f"{ident}_recurrent_bias", bias[1, two:],
                                       f"{what} bias[1] of the h gate: (units)")
    elif bias is not None:
        input_bias = writer.vector(f"{ident}_input_bias", bias, f"{what} bias: (3 * units)")
    name = f"{ident}_layer"
    writer.table(f"static const GruLayer {name} = {{\n"
                 f"    {input_dim}, {units}, {kernel}, {recurrent}, {input_bias}, {recurrent_bias},\n"
                 f"    {ACTIVATION_CODES[config['activation']]}, {ACTIVATION_CODES[config['recurrent_activation']]}, "
                 f"{int(config['reset_after'])}, {int(config['go_backwards'])}\n}};")
    writer.scratch(7 * units)
    return name


def masked_output(writer, config: dict) -> str:
    """The C expression for a GRU's output at masked steps (MASKED_ZERO when no mask applies: unread)."""
    if config["zero_output_for_mask"] or not writer.flow.masked:
        return "MASKED_ZERO"
    writer.flow.streaming_read = True
    return "streaming ? MASKED_CARRY : MASKED_PREVIOUS"


def _keep_last(writer, width: int) -> list[str]:
    """return_sequences=False: keep the output after the last processed step, in row 0."""
    flow = writer.flow
    flow.sequence = False
    flow.masked = False
    return [f"if (rows > 1)  /* return_sequences=False: keep the last output */",
            f"    memmove({flow.current}, {flow.current} + (rows - 1) * {width}, {width} * sizeof(float));",
            "rows = 1;"]


def _gru(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    ident = writer.ident(index, layer)
    table = gru_table(writer, ident, config, layer.weights, "", shape.input_dim, f"layer '{layer.name}'")
    field = writer.state_field(ident, config["units"], f"layer {index} '{layer.name}' (GRU): carry h")
    flow = writer.flow
    source, target = flow.current, flow.swap(shape.output_dim)
    lines = [f"gru_run(&{table}, {source}, rows, {writer.mask_arg()}, {masked_output(writer, config)}, "
             f"state->{field}, {target}, {config['units']}, 0, scratch);"]
    if not config["return_sequences"]:
        lines += _keep_last(writer, config["units"])
    writer.call(index, layer, f"GRU, {config['units']} units", lines)


MERGE_C = """
/* How Keras Bidirectional combines its halves: forward (rows, forward_units + backward_units for
   concat, else units), backward (rows, backward_units), both in time order; the result replaces forward. */
enum { MERGE_CONCAT, MERGE_SUM, MERGE_MUL, MERGE_AVE };

static void merge_directions(int merge_mode, float *forward, const float *backward, size_t rows,
                             size_t forward_units, size_t backward_units)
{
    const size_t stride = merge_mode == MERGE_CONCAT ? forward_units + backward_units : forward_units;
    size_t t, j;
    for (t = 0; t < rows; t++) {
        float *merged = forward + t * stride;
        const float *other = backward + t * backward_units;
        for (j = 0; j < backward_units; j++) {
            if (merge_mode == MERGE_CONCAT)
                merged[forward_units + j] = other[j];
            else if (merge_mode == MERGE_SUM)
                merged[j] += other[j];
            else if (merge_mode == MERGE_MUL)
                merged[j] *= other[j];
            else
                merged[j] = 0.5f * (merged[j] + other[j]);
        }
    }
}
"""


def _bidirectional(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    forward, backward = config["forward"], config["backward"]
    ident = writer.ident(index, layer)
    what = f"layer '{layer.name}'"
    tables = [gru_table(writer, f"{ident}_{direction}", config[direction], layer.weights, f"{direction}.",
                        shape.input_dim, f"{what} {direction}") for direction in ("forward", "backward")]
    fields = [writer.state_field(f"{ident}_{direction}", config[direction]["units"],
                                 f"layer {index} '{layer.name}' (Bidirectional): {direction} carry h")
              for direction in ("forward", "backward")]
    merge = config["merge_mode"]
    writer.backward_buffer(backward["units"])
    flow = writer.flow
    # concat (and None, returned as concat): the forward half is written straight into the merged rows.
    stride = shape.output_dim if merge in ("concat", None) else forward["units"]
    mask = writer.mask_arg()
    source, target = flow.current, flow.swap(shape.output_dim)
    lines = [f"gru_run(&{tables[0]}, {source}, rows, {mask}, {masked_output(writer, forward)}, state->{fields[0]}, "
             f"{target}, {stride}, 0, scratch);",
             f"gru_run(&{tables[1]}, {source}, rows, {mask}, {masked_output(writer, backward)}, state->{fields[1]}, "
             f"back, {backward['units']}, 1, scratch);"]
    if not forward["return_sequences"]:
        # The backward half's last output is at time 0, already row 0 of back.
        lines += _keep_last(writer, stride)
    lines.append(f"merge_directions({MERGE_CODES[merge]}, {target}, back, rows, {forward['units']}, "
                 f"{backward['units']});")
    writer.call(index, layer, f"Bidirectional(GRU), merge_mode={merge!r}", lines)


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
        if (layer->bias != NULL)
            memcpy(row, layer->bias, layer->units * sizeof *row);
        else
            memset(row, 0, layer->units * sizeof *row);
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
    bias = "NULL"
    if config["use_bias"]:
        bias = writer.vector(f"{ident}_bias", layer.weights["bias"], f"layer '{layer.name}' bias: (units)")
    table = f"{ident}_layer"
    writer.table(f"static const DenseLayer {table} = {{ {shape.input_dim}, {config['units']}, {kernel}, {bias}, "
                 f"{ACTIVATION_CODES[config['activation']]} }};")
    flow = writer.flow
    source, target = flow.current, flow.swap(shape.output_dim)
    writer.call(index, layer, f"Dense, {config['units']} units, {config['activation']}",
                [f"dense_run(&{table}, {source}, rows, {target});"])


FAMILIES: dict[str, Family] = {
    "masking": Family(MASKING_C, _masking),
    "gru": Family(GRU_C, _gru),
    "bidirectional": Family(MERGE_C, _bidirectional, needs=("gru",)),
    "dense": Family(DENSE_C, _dense),
}
