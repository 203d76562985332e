"""The C writer's front-end families: Conv1D, MaxPooling1D / AveragePooling1D, GlobalAveragePooling1D /
GlobalMaxPooling1D and BatchNormalization (semantics: ``gru_engine.frontends``).

Convolution and pooling change the number of rows the sequence holds: each ``<kind>_run`` returns
its output rows and the network carries on with them (``rows``). A BatchNormalization right after a
linear Conv1D or Dense is folded into that layer's weights by ``frontends.fold_batch_norms``, as the
engine does, before the families see the chain; any other is a per-channel affine map. A causal,
stride-1 Conv1D keeps its last (kernel_size - 1) * dilation_rate inputs in the state when the model
streams: step reads them before row 0, as ``Stream.step`` does; predict pads with zeros.
"""

from __future__ import annotations

from gru_engine import frontends
from gru_engine.spec import Layer, LayerShape

from .c_recurrent import ACTIVATION_CODES

WINDOW_C = """
/* Keras padding of a window moved along time; 'same' pads the smaller half on the left, as
   TensorFlow does, 'causal' pads size - 1 rows on the left. */
enum { PAD_VALID, PAD_SAME, PAD_CAUSAL };

/* Output rows of a window of `size` rows moved by `strides` over `rows` rows ('valid': rows >= size). */
static size_t window_rows(size_t rows, size_t size, size_t strides, int padding)
{
    return padding == PAD_VALID ? (rows - size) / strides + 1 : (rows + strides - 1) / strides;
}

/* Zero rows before row 0. */
static size_t left_padding(size_t rows, size_t size, size_t strides, int padding, size_t out_rows)
{
    const size_t need = (out_rows - 1) * strides + size;  /* rows the last window reaches */
    if (padding == PAD_CAUSAL)
        return size - 1;
    return padding == PAD_SAME && need > rows ? (need - rows) / 2 : 0;
}
"""

CONV1D_C = """
/* Keras Conv1D, channels_last:
     y[t, f] = activation(bias[f] + sum_k x[t * strides + k * dilation - pad, channels of group(f)] W[k, :, f])
   with x zero outside the input (or, streamed, the layer's last inputs of earlier calls before row 0). */
typedef struct {
    size_t input_dim, filters, taps, dilation, strides, groups;
    int padding;
    Matrix kernel;          /* W: (taps * input_dim / groups, filters); tap k is rows k * input_dim / groups .. */
    const float *bias;      /* (filters), NULL: use_bias=False */
    int activation;
} Conv1dLayer;

/* x (rows, input_dim) -> y (returned rows, filters). history: NULL (zero padding), or the last
   (taps - 1) * dilation input rows of earlier calls, oldest first (causal, strides 1: a stream),
   read before row 0 and replaced by the last rows of this call. */
static size_t conv1d_run(const Conv1dLayer *layer, const float *x, size_t rows, float *history, float *y)
{
    const size_t size = (layer->taps - 1) * layer->dilation + 1;
    const size_t out_rows = window_rows(rows, size, layer->strides, layer->padding);
    const size_t pad = left_padding(rows, size, layer->strides, layer->padding, out_rows);
    const size_t group_in = layer->input_dim / layer->groups, group_out = layer->filters / layer->groups;
    size_t t, k, g, kept;
    for (t = 0; t < out_rows; t++) {
        float *row = y + t * layer->filters;
        start_from(row, layer->bias, layer->filters);
        for (k = 0; k < layer->taps; k++) {
            const size_t at = t * layer->strides + k * layer->dilation;  /* input row + pad */
            const float *in;
            Matrix tap = layer->kernel;
            if (at < pad) {
                if (history == NULL)
                    continue;
                in = history + at * layer->input_dim;
            } else if (at - pad >= rows) {
                continue;
            } else {
                in = x + (at - pad) * layer->input_dim;
            }
            tap.values += k * group_in * tap.cols;
            for (g = 0; g < layer->groups; g++)
                matvec_acc(row + g * group_out, in + g * group_in, group_in, &tap, g * group_out, group_out);
        }
        activate(row, layer->filters, layer->activation);
    }
    if (history != NULL) {
        kept = pad > rows ? pad - rows : 0;  /* old rows still among the last pad */
        memmove(history, history + (pad - kept) * layer->input_dim, kept * layer->input_dim * sizeof *history);
        memcpy(history + kept * layer->input_dim, x + (rows - (pad - kept)) * layer->input_dim,
               (pad - kept) * layer->input_dim * sizeof *history);
    }
    return out_rows;
}
"""

POOL1D_C = """
/* Keras MaxPooling1D / AveragePooling1D: y[t, c] = max or mean of x[i, c] over the window's rows
   inside the input (padded rows never count, as TensorFlow pools). Returns the output rows. */
static size_t pool1d_run(const float *x, size_t rows, size_t dim, size_t size, size_t strides, int padding,
                         int is_max, float *y)
{
    const size_t out_rows = window_rows(rows, size, strides, padding);
    const size_t pad = left_padding(rows, size, strides, padding, out_rows);
    size_t t, i, c;
    for (t = 0; t < out_rows; t++) {
        const size_t start = t * strides > pad ? t * strides - pad : 0;
        const size_t end = t * strides + size - pad < rows ? t * strides + size - pad : rows;
        float *row = y + t * dim;
        memcpy(row, x + start * dim, dim * sizeof *row);
        for (i = start + 1; i < end; i++) {
            const float *source = x + i * dim;
            for (c = 0; c < dim; c++)
                row[c] = is_max ? (source[c] > row[c] ? source[c] : row[c]) : row[c] + source[c];
        }
        if (!is_max) {
            const float inverse = 1.0f / (float)(end - start);
            for (c = 0; c < dim; c++)
                row[c] *= inverse;
        }
    }
    return out_rows;
}
"""

GLOBAL_POOL_C = """
/* Keras GlobalMaxPooling1D (every row) / GlobalAveragePooling1D (the rows mask keeps; mask NULL:
   all): y (dim) from x (rows, dim). All rows masked averages 0 / 0 = NaN, as Keras does. */
static void global_pool_run(const float *x, size_t rows, size_t dim, const float *mask, int is_max, float *y)
{
    float count = 0.0f;
    size_t t, c;
    if (is_max) {
        memcpy(y, x, dim * sizeof *y);
        for (t = 1; t < rows; t++)
            for (c = 0; c < dim; c++)
                y[c] = x[t * dim + c] > y[c] ? x[t * dim + c] : y[c];
        return;
    }
    memset(y, 0, dim * sizeof *y);
    for (t = 0; t < rows; t++) {
        const float weight = mask != NULL ? mask[t] : 1.0f;
        count += weight;
        if (weight != 0.0f)
            for (c = 0; c < dim; c++)
                y[c] += x[t * dim + c];
    }
    for (c = 0; c < dim; c++)
        y[c] /= count;
}
"""

AFFINE_C = """
/* Keras BatchNormalization at inference, in place on x (rows, dim): x * scale + shift per channel,
   scale = gamma / sqrt(moving_variance + epsilon), shift = beta - moving_mean * scale. */
static void affine_run(float *x, size_t rows, size_t dim, const float *scale, const float *shift)
{
    size_t t, c;
    for (t = 0; t < rows; t++)
        for (c = 0; c < dim; c++)
            x[t * dim + c] = x[t * dim + c] * scale[c] + shift[c];
}
"""

PADDING_CODES = {"valid": "PAD_VALID", "same": "PAD_SAME", "causal": "PAD_CAUSAL"}


def _conv1d(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    ident = writer.ident(index, layer)
    kernel = layer.weights["kernel"]  # (K, I / G, F)
    matrix = writer.matrix(f"{ident}_kernel", kernel.reshape(-1, kernel.shape[-1]),
                           f"layer '{layer.name}' kernel: (kernel_size * input_dim / groups, filters)")
    bias = writer.bias(f"{ident}_bias", layer.weights.get("bias"), f"layer '{layer.name}' bias: (filters)")
    table = f"{ident}_layer"
    writer.table(f"static const Conv1dLayer {table} = {{ {shape.input_dim}, {config['filters']}, "
                 f"{config['kernel_size']}, {config['dilation_rate']}, {config['strides']}, {config['groups']}, "
                 f"{PADDING_CODES[config['padding']]}, {matrix}, {bias}, {ACTIVATION_CODES[config['activation']]} }};")
    flow = writer.flow
    history = "NULL"
    steps = frontends.history_steps(layer)
    if writer.can_stream and steps:
        field = writer.state_field(f"{ident}_history", steps * shape.input_dim,
                                   f"layer {index} Conv1D: its last {steps} inputs, oldest first")
        history = f"streaming ? state->{field} : NULL"
        flow.streaming_read = True
    flow.masked = False  # Keras's Conv1D drops the mask
    source, target = flow.current, flow.swap()
    folded = " (BatchNormalization folded in)" if writer.folded(layer) else ""
    writer.call(index, layer, f"Conv1D, {config['filters']} filters of {config['kernel_size']}, "
                              f"padding {config['padding']}{folded}",
                [f"rows = conv1d_run(&{table}, {source}, rows, {history}, {target});"])


def _pool1d(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    config = layer.config
    flow = writer.flow
    flow.masked = False  # Keras's pooling drops the mask
    source, target = flow.current, flow.swap()
    writer.call(index, layer, f"{frontends.KERAS_CLASS_NAMES[layer.kind]}, pool_size {config['pool_size']}",
                [f"rows = pool1d_run({source}, rows, {shape.input_dim}, {config['pool_size']}, {config['strides']}, "
                 f"{PADDING_CODES[config['padding']]}, {int(layer.kind == 'max_pooling1d')}, {target});"])


def _global_pool(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    flow = writer.flow
    is_max = layer.kind == "global_max_pooling1d"
    mask = "NULL" if is_max else writer.mask_arg()  # Keras's GlobalMaxPooling1D ignores the mask
    flow.masked = False
    source, target = flow.current, flow.swap()
    writer.call(index, layer, frontends.KERAS_CLASS_NAMES[layer.kind],
                [f"global_pool_run({source}, rows, {shape.input_dim}, {mask}, {int(is_max)}, {target});",
                 "rows = 1;"])


def _batch_normalization(writer, index: int, layer: Layer, shape: LayerShape) -> None:
    ident = writer.ident(index, layer)
    scale, shift = frontends.batch_norm_affine(layer)
    scale = writer.vector(f"{ident}_scale", scale, f"layer '{layer.name}' gamma / sqrt(variance + epsilon): (C)")
    shift = writer.vector(f"{ident}_shift", shift, f"layer '{layer.name}' beta - mean * scale: (C)")
    writer.call(index, layer, "BatchNormalization",
                [f"affine_run({writer.flow.current}, rows, {shape.input_dim}, {scale}, {shift});"])


FRONTEND_SOURCES = {"conv1d": (WINDOW_C, CONV1D_C), "max_pooling1d": (WINDOW_C, POOL1D_C),
                    "average_pooling1d": (WINDOW_C, POOL1D_C), "global_average_pooling1d": (GLOBAL_POOL_C,),
                    "global_max_pooling1d": (GLOBAL_POOL_C,), "batch_normalization": (AFFINE_C,)}
FRONTEND_EMITTERS = {"conv1d": _conv1d, "max_pooling1d": _pool1d, "average_pooling1d": _pool1d,
                     "global_average_pooling1d": _global_pool, "global_max_pooling1d": _global_pool,
                     "batch_normalization": _batch_normalization}


def output_steps_c(spec) -> list[str]:
    """The body of NAME_output_steps: the time axis through every layer that resizes it."""
    lines = []
    for layer in spec.layers:
        shape = frontends.window(layer)
        if shape is not None:
            size, strides, padding = shape
            if padding == "valid":
                rule = f"steps - {size - 1}" if strides == 1 else f"(steps - {size}) / {strides} + 1"
            elif strides > 1:
                rule = f"(steps + {strides - 1}) / {strides}"
            else:
                continue  # 'same' and 'causal' keep every step at strides 1
            lines.append(f"    steps = {rule};  /* '{layer.name}' */")
        elif layer.kind in frontends.GLOBAL_POOLING_KINDS:
            lines.append(f"    steps = 1;  /* '{layer.name}' */")
    return lines
