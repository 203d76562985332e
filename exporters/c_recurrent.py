"""The C writer's recurrent families: GRU, LSTM, SimpleRNN, and Bidirectional over any of them.

Each recurrent kind is a ``Cell``: its C (a layer table type and one ``<kind>_run`` function with
the same signature for every kind), a Python ``table`` that declares one direction's weights, and
its carries per direction (LSTM: h and c, kept side by side in one state field). Masking is shared:
a masked step keeps the carry and emits zeros, the previous output or the carry (see RECURRENT_C).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from gru_engine.spec import Layer, LayerShape

ACTIVATION_CODES = {"linear": "ACT_LINEAR", "tanh": "ACT_TANH", "sigmoid": "ACT_SIGMOID",
                    "hard_sigmoid": "ACT_HARD_SIGMOID", "relu": "ACT_RELU", "softmax": "ACT_SOFTMAX"}
MERGE_CODES = {"concat": "MERGE_CONCAT", None: "MERGE_CONCAT", "sum": "MERGE_SUM", "mul": "MERGE_MUL",
               "ave": "MERGE_AVE"}

RECURRENT_C = """
/* What a recurrent layer emits at a masked (skipped) step: zeros (Keras zero_output_for_mask=True),
   its previous output in this call, zeros before its first unmasked step (Keras predict), or the
   carry (a stream, so that each step equals predict on everything fed so far). */
enum { MASKED_ZERO, MASKED_PREVIOUS, MASKED_CARRY };

/* GCC 12.2 with AVX-512 at -O3 miscompiles a copy of a run function specialised to one layer's
   constant table: start_from's memcpy of the constant bias becomes 64-byte stores of constants,
   one of them wrong (an LSTM(50) with Keras's unit_forget_bias got 1.0 in gate floats 100..111,
   whose bias is 0: its output 0.47 instead of -0.002). A compiler bug, not undefined behaviour
   here: strict aliasing off, UBSan and -O2 all agree with the engine, and GCC's -mstore-max=256
   or -fno-ipa-cp-clone avoid it. So the run functions are kept whole, not specialised. */
#if defined(__GNUC__) && !defined(__clang__)
#define NOT_SPECIALISED __attribute__((noinline, noclone))
#else
#define NOT_SPECIALISED
#endif

/* Keras skips a masked step: the carry passes through unchanged and the output row o gets zeros,
   or h once a step was processed (*emitted). Returns 1 when step t is masked; otherwise marks the
   step as processed, unless masked steps output zeros (masked_output MASKED_ZERO). */
static int masked_step(const float *mask, size_t t, int masked_output, int *emitted, const float *h, float *o,
                       size_t units)
{
    size_t j;
    if (mask == NULL || mask[t] != 0.0f) {
        if (masked_output != MASKED_ZERO)
            *emitted = 1;
        return 0;
    }
    for (j = 0; j < units; j++)
        o[j] = *emitted ? h[j] : 0.0f;
    return 1;
}

/* Every <kind>_run below runs `steps` steps of x (steps, input_dim) from the carry, updated in
   place. The output after processing step s goes to out + s * out_stride (Keras returns
   go_backwards outputs in processing order), or, with time_ordered (a Bidirectional's backward
   half), to the row of its time step. mask (steps) or NULL. */
"""

GRU_C = """
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
    const float *input_bias;       /* (kernel.cols): b; z and r also hold their recurrent bias; NULL: use_bias=False */
    const float *recurrent_bias;   /* (kernel.cols): 0 | 0 | rb_h, reset_after=True with use_bias only, else NULL */
    int activation, recurrent_activation;
    int reset_after;               /* Keras reset_after */
    int go_backwards;              /* Keras go_backwards: steps run from the last to the first */
} GruLayer;

/* carry: h (units); scratch: 2 * kernel.cols + units floats. */
NOT_SPECIALISED static void gru_run(const GruLayer *layer, const float *x, size_t steps, const float *mask, int masked_output,
                    float *h, float *out, size_t out_stride, int time_ordered, float *scratch)
{
    const size_t units = layer->units, two = 2 * units, width = layer->kernel.cols;
    float *gx = scratch;               /* (width) x W + b, then the gates z | r | hh */
    float *gh = scratch + width;       /* (width) h U (+ rb_h) */
    float *rh = scratch + 2 * width;   /* (H) r * h, for reset_after=False */
    int emitted = masked_output == MASKED_CARRY;
    size_t s, j;
    for (s = 0; s < steps; s++) {
        const size_t t = layer->go_backwards ? steps - 1 - s : s;
        float *o = out + (time_ordered ? t : s) * out_stride;
        if (masked_step(mask, t, masked_output, &emitted, h, o, units))
            continue;
        /* whole padded rows: the products have no scalar remainder */
        start_from(gx, layer->input_bias, width);
        matvec_acc(gx, x + t * layer->input_dim, layer->input_dim, &layer->kernel, 0, width);
        if (layer->reset_after) {
            start_from(gh, layer->recurrent_bias, width);
            matvec_acc(gh, h, units, &layer->recurrent_kernel, 0, width);
        } else {
            memset(gh, 0, two * sizeof *gh);
            matvec_acc(gh, h, units, &layer->recurrent_kernel, 0, two);
        }
        for (j = 0; j < two; j++)
            gx[j] += gh[j];
        activate(gx, two, layer->recurrent_activation);
        if (layer->reset_after) {
            for (j = 0; j < units; j++)
                gx[two + j] += gx[units + j] * gh[two + j];
        } else {
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

LSTM_C = """
/* One direction of a Keras LSTM, gates i | f | c | o as in Keras's weight columns:
     i = recurrent_activation(x W_i + h U_i + b_i)     f = recurrent_activation(x W_f + h U_f + b_f)
     g = activation(x W_c + h U_c + b_c)                o = recurrent_activation(x W_o + h U_o + b_o)
     c' = f * c + i * g                                 h' = o * activation(c')                  */
typedef struct {
    size_t input_dim, units;
    Matrix kernel;             /* W: (input_dim, 4 * units) */
    Matrix recurrent_kernel;   /* U: (units, 4 * units) */
    const float *bias;         /* (kernel.cols), NULL: use_bias=False */
    int activation, recurrent_activation;
    int go_backwards;          /* Keras go_backwards: steps run from the last to the first */
} LstmLayer;

/* carry: h then c (2 * units); scratch: kernel.cols + units floats. */
NOT_SPECIALISED static void lstm_run(const LstmLayer *layer, const float *x, size_t steps, const float *mask, int masked_output,
                     float *carry, float *out, size_t out_stride, int time_ordered, float *scratch)
{
    const size_t units = layer->units, width = layer->kernel.cols;
    float *h = carry, *c = carry + units;
    float *g = scratch;             /* (width) the gates' pre-activations, then i | f | g | o */
    float *cell = scratch + width;  /* (H) activation(c') */
    int emitted = masked_output == MASKED_CARRY;
    size_t s, j;
    for (s = 0; s < steps; s++) {
        const size_t t = layer->go_backwards ? steps - 1 - s : s;
        float *o = out + (time_ordered ? t : s) * out_stride;
        if (masked_step(mask, t, masked_output, &emitted, h, o, units))
            continue;
        start_from(g, layer->bias, width);
        matvec_acc(g, x + t * layer->input_dim, layer->input_dim, &layer->kernel, 0, width);
        matvec_acc(g, h, units, &layer->recurrent_kernel, 0, width);
        activate(g, 2 * units, layer->recurrent_activation);   /* i | f */
        activate(g + 2 * units, units, layer->activation);     /* g */
        activate(g + 3 * units, units, layer->recurrent_activation);  /* o */
        for (j = 0; j < units; j++) {
            c[j] = g[units + j] * c[j] + g[j] * g[2 * units + j];
            cell[j] = c[j];
        }
        activate(cell, units, layer->activation);
        for (j = 0; j < units; j++) {
            h[j] = g[3 * units + j] * cell[j];
            o[j] = h[j];
        }
    }
}
"""

SIMPLE_RNN_C = """
/* One direction of a Keras SimpleRNN: h' = activation(x W + h U + b). */
typedef struct {
    size_t input_dim, units;
    Matrix kernel;             /* W: (input_dim, units) */
    Matrix recurrent_kernel;   /* U: (units, units) */
    const float *bias;         /* (kernel.cols), NULL: use_bias=False */
    int activation;
    int go_backwards;          /* Keras go_backwards: steps run from the last to the first */
} SimpleRnnLayer;

/* carry: h (units); scratch: kernel.cols floats. */
NOT_SPECIALISED static void simple_rnn_run(const SimpleRnnLayer *layer, const float *x, size_t steps, const float *mask,
                           int masked_output, float *h, float *out, size_t out_stride, int time_ordered,
                           float *scratch)
{
    const size_t units = layer->units, width = layer->kernel.cols;
    int emitted = masked_output == MASKED_CARRY;
    size_t s;
    for (s = 0; s < steps; s++) {
        const size_t t = layer->go_backwards ? steps - 1 - s : s;
        float *o = out + (time_ordered ? t : s) * out_stride;
        if (masked_step(mask, t, masked_output, &emitted, h, o, units))
            continue;
        start_from(scratch, layer->bias, width);
        matvec_acc(scratch, x + t * layer->input_dim, layer->input_dim, &layer->kernel, 0, width);
        matvec_acc(scratch, h, units, &layer->recurrent_kernel, 0, width);
        activate(scratch, units, layer->activation);
        memcpy(h, scratch, units * sizeof *h);
        memcpy(o, scratch, units * sizeof *o);
    }
}
"""


def _kernels(writer, ident: str, weights: dict, prefix: str, what: str, gates: str) -> tuple[str, str]:
    return (writer.matrix(f"{ident}_kernel", weights[prefix + "kernel"],
                          f"{what} kernel W: (input_dim, {gates})", pad=True),
            writer.matrix(f"{ident}_recurrent_kernel", weights[prefix + "recurrent_kernel"],
                          f"{what} recurrent_kernel U: (units, {gates})", pad=True))


def _gru_table(writer, ident: str, config: dict, weights: dict, prefix: str, input_dim: int, what: str) -> str:
    units = config["units"]
    kernel, recurrent = _kernels(writer, ident, weights, prefix, what, "3 * units), columns z | r | h")
    input_bias = recurrent_bias = "NULL"
    bias = weights.get(prefix + "bias")
    width = writer.padded(3 * units)
    if bias is not None and config["reset_after"]:
        # z and r add both biases to one sum: folded into one vector, as the engine does.
        two = 2 * units
        folded = np.concatenate([bias[0, :two] + bias[1, :two], bias[0, two:]])
        input_bias = writer.vector(f"{ident}_input_bias", folded,
                                   f"{what} bias[0] with bias[1] added to z | r: (3 * units)", width)
        h_only = np.concatenate([np.zeros(two, np.float32), bias[1, two:]])
        recurrent_bias = writer.vector(f"{ident}_recurrent_bias", h_only,
                                       f"{what} zeros for z | r, bias[1] of the h gate: (3 * units)", width)
    elif bias is not None:
        input_bias = writer.vector(f"{ident}_input_bias", bias, f"{what} bias: (3 * units)", width)
    name = f"{ident}_layer"
    writer.table(f"static const GruLayer {name} = {{\n"
                 f"    {input_dim}, {units}, {kernel}, {recurrent}, {input_bias}, {recurrent_bias},\n"
                 f"    {ACTIVATION_CODES[config['activation']]}, {ACTIVATION_CODES[config['recurrent_activation']]}, "
                 f"{int(config['reset_after'])}, {int(config['go_backwards'])}\n}};")
    writer.scratch(2 * width + units)
    return name


def _lstm_table(writer, ident: str, config: dict, weights: dict, prefix: str, input_dim: int, what: str) -> str:
    units = config["units"]
    kernel, recurrent = _kernels(writer, ident, weights, prefix, what, "4 * units), columns i | f | c | o")
    bias = writer.bias(f"{ident}_bias", weights.get(prefix + "bias"), f"{what} bias: (4 * units)", pad=True)
    name = f"{ident}_layer"
    writer.table(f"static const LstmLayer {name} = {{\n"
                 f"    {input_dim}, {units}, {kernel}, {recurrent}, {bias},\n"
                 f"    {ACTIVATION_CODES[config['activation']]}, {ACTIVATION_CODES[config['recurrent_activation']]}, "
                 f"{int(config['go_backwards'])}\n}};")
    writer.scratch(writer.padded(4 * units) + units)
    return name


def _simple_rnn_table(writer, ident: str, config: dict, weights: dict, prefix: str, input_dim: int,
                      what: str) -> str:
    units = config["units"]
    kernel, recurrent = _kernels(writer, ident, weights, prefix, what, "units)")
    bias = writer.bias(f"{ident}_bias", weights.get(prefix + "bias"), f"{what} bias: (units)", pad=True)
    name = f"{ident}_layer"
    writer.table(f"static const SimpleRnnLayer {name} = {{ {input_dim}, {units}, {kernel}, {recurrent}, {bias}, "
                 f"{ACTIVATION_CODES[config['activation']]}, {int(config['go_backwards'])} }};")
    writer.scratch(writer.padded(units))
    return name


@dataclasses.dataclass(frozen=True)
class Cell:
    """One recurrent kind: its C, how to declare a direction, and what its state field holds."""

    keras_class: str
    c_source: str
    table: Callable[..., str]   # (writer, ident, config, weights, prefix, input_dim, what) -> C table name
    run: str                    # the C function, same signature for every kind
    carries: tuple[str, ...]    # per direction, side by side in one state field


CELLS = {
    "gru": Cell("GRU", GRU_C, _gru_table, "gru_run", ("h",)),
    "lstm": Cell("LSTM", LSTM_C, _lstm_table, "lstm_run", ("h", "c")),
    "simple_rnn": Cell("SimpleRNN", SIMPLE_RNN_C, _simple_rnn_table, "simple_rnn_run", ("h",)),
}


def c_sources(kind: str) -> tuple[str, ...]:
    """The C a recurrent kind needs, shared part first (the writer emits each part once)."""
    return RECURRENT_C, CELLS[kind].c_source


def masked_output(writer, config: dict) -> str:
    """The C expression for the output at masked steps (MASKED_ZERO when no mask applies: unread)."""
    if config["zero_output_for_mask"] or not writer.flow.masked:
        return "MASKED_ZERO"
    writer.flow.streaming_read = True
    return "streaming ? MASKED_CARRY : MASKED_PREVIOUS"


def keep_last(writer, width: int) -> list[str]:
    """return_sequences=False: keep the output after the last processed step, in row 0."""
    flow = writer.flow
    flow.masked = False
    return ["if (rows > 1)  /* return_sequences=False: keep the last output */",
            f"    memmove({flow.current}, {flow.current} + (rows - 1) * {width}, {width} * sizeof(float));",
            "rows = 1;"]


def _direction(writer, cell: Cell, index: int, layer: Layer, ident: str, config: dict, prefix: str,
               input_dim: int, what: str) -> tuple[str, str]:
    """Declare one direction: (its C table, its state field)."""
    table = cell.table(writer, ident, config, layer.weights, prefix, input_dim, what)
    carries = " | ".join(cell.carries)
    field = writer.state_field(ident, len(cell.carries) * config["units"], f"layer {index} {what}: carry {carries}")
    return table, field


def recurrent(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    """A GRU, LSTM or SimpleRNN layer."""
    config, cell = layer.config, CELLS[layer.kind]
    ident = writer.ident(index, layer)
    table, field = _direction(writer, cell, index, layer, ident, config, "", shape.input_dim,
                              f"'{layer.name}' ({cell.keras_class})")
    flow = writer.flow
    source, target = flow.current, flow.swap()
    lines = [f"{cell.run}(&{table}, {source}, rows, {writer.mask_arg()}, {masked_output(writer, config)}, "
             f"state->{field}, {target}, {config['units']}, 0, scratch);"]
    if not config["return_sequences"]:
        lines += keep_last(writer, config["units"])
    writer.call(index, layer, f"{cell.keras_class}, {config['units']} units", lines)


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


def bidirectional_sources(layer: Layer) -> tuple[str, ...]:
    return (*c_sources(layer.config.get("layer", "gru")), MERGE_C)


def bidirectional(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    cell = CELLS[config.get("layer", "gru")]
    forward, backward = config["forward"], config["backward"]
    ident = writer.ident(index, layer)
    tables, fields = zip(*(
        _direction(writer, cell, index, layer, f"{ident}_{direction}", config[direction], f"{direction}.",
                   shape.input_dim, f"'{layer.name}' (Bidirectional {cell.keras_class}) {direction}")
        for direction in ("forward", "backward")))
    merge = config["merge_mode"]
    writer.backward_buffer(backward["units"])
    flow = writer.flow
    # concat (and None, returned as concat): the forward half is written straight into the merged rows.
    stride = shape.output_dim if merge in ("concat", None) else forward["units"]
    mask = writer.mask_arg()
    source, target = flow.current, flow.swap()
    lines = [f"{cell.run}(&{tables[0]}, {source}, rows, {mask}, {masked_output(writer, forward)}, "
             f"state->{fields[0]}, {target}, {stride}, 0, scratch);",
             f"{cell.run}(&{tables[1]}, {source}, rows, {mask}, {masked_output(writer, backward)}, "
             f"state->{fields[1]}, back, {backward['units']}, 1, scratch);"]
    if not forward["return_sequences"]:
        # The backward half's last output is at time 0, already row 0 of back.
        lines += keep_last(writer, stride)
    lines.append(f"merge_directions({MERGE_CODES[merge]}, {target}, back, rows, {forward['units']}, "
                 f"{backward['units']});")
    writer.call(index, layer, f"Bidirectional({cell.keras_class}), merge_mode={merge!r}", lines)
