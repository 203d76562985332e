"""Conv1D (Keras, channels_last): a projection over a window of rows.

    y[t, f] = activation(bias[f] + sum_k x[t * strides + k * dilation - pad_left, channels of group(f)]
                                            @ kernel[group(f), k, :, f within its group])

with x zero outside [0, rows), or, for a streamed causal layer, the layer's last inputs of earlier
calls before row 0 (its history, kept in the carry). Every (tap, group) is one shared product over
all the output rows that read inside the input, four rows per weight load (``products``).
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import activate
from .products import accumulate_matvec, accumulate_matvec4

PAD_VALID, PAD_SAME, PAD_CAUSAL = range(3)


@njit(**KERNEL_FLAGS)
def window_rows(rows, size, strides, padding):
    """Output rows of a window of ``size`` steps moved by ``strides`` over ``rows`` input rows
    (< 1 when a 'valid' window does not fit)."""
    if padding == PAD_VALID:
        return (rows - size) // strides + 1
    return (rows + strides - 1) // strides


@njit(**KERNEL_FLAGS)
def left_padding(rows, size, strides, padding, out_rows):
    """Zero rows before row 0: none for 'valid', size - 1 for 'causal', and for 'same' the smaller
    half of what the last window needs (TensorFlow's split)."""
    if padding == PAD_VALID:
        return 0
    if padding == PAD_CAUSAL:
        return size - 1
    return max((out_rows - 1) * strides + size - rows, 0) // 2


@njit(**KERNEL_FLAGS)
def _ceil_div(a, b):
    return -((-a) // b)


@njit(**KERNEL_FLAGS)
def conv1d_layer(x, samples, rows, input_dim, kernel, bias, strides, dilation, padding, activation,
                 carry, history, out):
    """Run a Conv1D over ``rows`` rows of ``samples`` samples; return the number of output rows.

    x:       (S, >=rows, >=I)        layer input
    kernel:  (G, K, I / G, F / G)    per group, per tap: a (channels, filters) matrix
    bias:    (F,)
    carry:   (S, C)                  with ``history`` >= 0, carry[s, history:history + (K-1)*dilation*I]
                                     holds the last (K - 1) * dilation input rows of earlier calls,
                                     oldest first (causal stride 1 only); they are read before row 0
                                     and replaced by this call's last rows
    out:     (S, >=out_rows, >=F)    C-contiguous
    """
    prefer_wide_vectors()
    groups, taps, group_in, group_out = kernel.shape[0], kernel.shape[1], kernel.shape[2], kernel.shape[3]
    filters = groups * group_out
    size = (taps - 1) * dilation + 1
    out_rows = window_rows(rows, size, strides, padding)
    pad = left_padding(rows, size, strides, padding, out_rows)
    for s in range(samples):
        for t in range(out_rows):
            row = out[s, t]  # (>=F,)
            for f in range(filters):
                row[f] = bias[f]
    for g in range(groups):
        c0, f0 = g * group_in, g * group_out
        for tap in range(taps):
            matrix = kernel[g, tap]  # (I/G, F/G)
            shift = tap * dilation - pad
            # Output rows t whose input row t * strides + shift lies inside [0, rows).
            first = max(0, _ceil_div(-shift, strides))
            stop = min(out_rows, (rows - 1 - shift) // strides + 1)
            if history >= 0:
                for s in range(samples):
                    for t in range(min(first, out_rows)):
                        start = history + (pad + t + shift) * input_dim + c0
                        accumulate_matvec(carry[s, start:start + group_in], matrix,
                                          out[s, t][f0:f0 + group_out])
            span = stop - first
            if span <= 0:
                continue
            total = samples * span
            q = 0
            while q + 4 <= total:
                s0, t0 = divmod(q, span)
                s1, t1 = divmod(q + 1, span)
                s2, t2 = divmod(q + 2, span)
                s3, t3 = divmod(q + 3, span)
                t0, t1, t2, t3 = t0 + first, t1 + first, t2 + first, t3 + first
                accumulate_matvec4(
                    x[s0, t0 * strides + shift][c0:c0 + group_in], x[s1, t1 * strides + shift][c0:c0 + group_in],
                    x[s2, t2 * strides + shift][c0:c0 + group_in], x[s3, t3 * strides + shift][c0:c0 + group_in],
                    matrix, out[s0, t0][f0:f0 + group_out], out[s1, t1][f0:f0 + group_out],
                    out[s2, t2][f0:f0 + group_out], out[s3, t3][f0:f0 + group_out])
                q += 4
            while q < total:
                s0, t0 = divmod(q, span)
                t0 += first
                accumulate_matvec(x[s0, t0 * strides + shift][c0:c0 + group_in], matrix,
                                  out[s0, t0][f0:f0 + group_out])
                q += 1
    if history >= 0:
        _keep_history(x, samples, rows, input_dim, pad, carry, history)
    for s in range(samples):
        for t in range(out_rows):
            activate(out[s, t][:filters], activation)
    return out_rows


@njit(**KERNEL_FLAGS)
def _keep_history(x, samples, rows, input_dim, length, carry, history):
    """carry[s, history:...] (``length`` rows of I, oldest first) := the last ``length`` rows of
    (old history, x[s, :rows])."""
    prefer_wide_vectors()
    kept = max(length - rows, 0)  # old rows still among the last ``length``
    for s in range(samples):
        buffer = carry[s, history:history + length * input_dim]  # (length * I,)
        for j in range(kept * input_dim):
            buffer[j] = buffer[j + (length - kept) * input_dim]
        for r in range(length - kept):
            source = x[s, rows - (length - kept) + r]
            target = (kept + r) * input_dim
            for c in range(input_dim):
                buffer[target + c] = source[c]
