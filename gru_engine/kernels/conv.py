"""Conv1D (Keras, channels_last): a projection over a window of rows.

    y[t, f] = activation(bias[f] + sum_k x[t * strides + k * dilation - pad_left, channels of group(f)]
                                            @ kernel[group(f), k, :, f within its group])

with x zero outside [0, rows), or, for a streamed causal layer, the layer's last inputs of earlier
calls before row 0 (its history, kept in the carry). Two ways to run it, by ``kernel_layout``:

- windows (one group, dilation 1): once the input rows sit side by side, the K taps of I channels
  an output row reads are K * I consecutive floats, so each output row is one product of length
  K * I (for one input channel: 12 multiply-adds per filter instead of 12 products of one);
- taps (groups, or dilation > 1): every (tap, group) is one product of I / G channels, shared by all
  the output rows that read inside the input.

Either way four output rows share each load of the kernel.
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import ZERO, activate
from .products import LANES, accumulate_matvec, accumulate_matvec4, four_rows, shaped

PAD_VALID, PAD_SAME, PAD_CAUSAL = range(3)
# How the runtime packs a Conv1D kernel (see ``kernel_layout``).
LAYOUT_TAPS, LAYOUT_WINDOWS, LAYOUT_DOTS = range(3)


@njit(**KERNEL_FLAGS)
def kernel_layout(groups, dilation, taps, input_dim):
    """How conv1d_layer reads a Conv1D kernel, and so how the runtime packs it:

    LAYOUT_TAPS:    (G, K, I / G, F / G)  per group, per tap, a (channels, filters) matrix
    LAYOUT_WINDOWS: (K * I, F)            one group, dilation 1: a window's taps by channels (the
                                          same floats as LAYOUT_TAPS with G = 1)
    LAYOUT_DOTS:    (F, K * I)            the same transposed, for windows of at least LANES floats:
                                          the products then run along the window, in full vectors,
                                          where along 16 filters LLVM runs them 4 wide (measured,
                                          Conv1D(16, 12) over 30 rows of 16 channels: 3.3 us as rows,
                                          1.5 us as dots; over 120 rows of one channel, 12-float
                                          windows: 0.9 us as rows, 1.7 us as dots)
    """
    if groups != 1 or dilation != 1:
        return LAYOUT_TAPS
    return LAYOUT_DOTS if taps * input_dim >= LANES else LAYOUT_WINDOWS


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
def conv1d_layer(x, samples, rows, input_dim, kernel, taps, groups, bias, strides, dilation, padding, activation,
                 carry, history, packed, out):
    """Run a Conv1D over ``rows`` rows of ``samples`` samples; return the number of output rows.

    x:       (S, T, D)               layer input, C-contiguous, rows <= T, channels I <= D
    kernel:  (K * I * F / G,)        packed as ``kernel_layout`` says
    bias:    (F,)
    carry:   (S, C)                  with ``history`` >= 0, carry[s, history:history + (K-1)*dilation*I]
                                     holds the last (K - 1) * dilation input rows of earlier calls,
                                     oldest first (causal stride 1 only); they are read before row 0
                                     and replaced by this call's last rows
    packed:  (S, >=rows*I)           scratch: the input rows side by side
    out:     (S, >=out_rows, >=F)    C-contiguous
    """
    prefer_wide_vectors()
    filters = bias.shape[0]
    size = (taps - 1) * dilation + 1
    out_rows = window_rows(rows, size, strides, padding)
    pad = left_padding(rows, size, strides, padding, out_rows)
    for s in range(samples):
        for t in range(out_rows):
            row = out[s, t]  # (>=F,)
            for f in range(filters):
                row[f] = bias[f]
    layout = kernel_layout(groups, dilation, taps, input_dim)
    if layout == LAYOUT_TAPS:
        _tap_products(x, samples, rows, shaped(kernel, 0, (groups, taps, input_dim // groups, filters // groups)),
                      strides, dilation, pad, out_rows, carry, history, out)
    elif layout == LAYOUT_DOTS:
        _window_products(x, samples, rows, input_dim, shaped(kernel, 0, (filters, taps * input_dim)), True, strides,
                         pad, out_rows, carry, history, packed, out)
    else:
        _window_products(x, samples, rows, input_dim, shaped(kernel, 0, (taps * input_dim, filters)), False, strides,
                         pad, out_rows, carry, history, packed, out)
    if history >= 0:
        _keep_history(x, samples, rows, input_dim, pad, carry, history)
    for s in range(samples):
        for t in range(out_rows):
            activate(out[s, t][:filters], activation)
    return out_rows


@njit(**KERNEL_FLAGS)
def _window_products(x, samples, rows, input_dim, matrix, dots, strides, pad, out_rows, carry, history, packed,
                     out):
    """out[s, t, :F] += window(s, t) @ kernel, window(s, t) the K * I inputs output row t reads, taps
    by channels (one group, dilation 1).

    matrix: (F, K * I) if ``dots``, else (K * I, F)
    A window inside the input is one run of ``packed``; one reaching into the padding reads zeros
    there, so its product shrinks to the taps inside the input, plus, for a stream, those reading
    the kept rows.
    """
    prefer_wide_vectors()
    filters, width = (matrix.shape[0], matrix.shape[1]) if dots else (matrix.shape[1], matrix.shape[0])
    taps = width // input_dim
    for s in range(samples):
        target = packed[s]  # (>=rows*I,)
        for r in range(rows):
            source = x[s, r]  # (D,)
            for c in range(input_dim):
                target[r * input_dim + c] = source[c]
    # The output rows whose window lies inside: t * strides - pad >= 0 and t * strides - pad + K <= rows.
    first = min(out_rows, _ceil_div(pad, strides))
    stop = max(first, min(out_rows, (rows - taps + pad) // strides + 1))
    _shared_products(packed, samples, first, stop, -pad * input_dim, strides * input_dim, matrix, dots, out, 0)
    for s in range(samples):
        for edge in range(out_rows - (stop - first)):  # the rows before ``first`` and from ``stop`` on
            t = edge if edge < first else edge + stop - first
            acc = out[s, t][:filters]  # (F,)
            start = t * strides - pad  # the input row of tap 0
            inside = min(max(-start, 0), taps)  # the first tap inside the input
            end = max(min(taps, rows - start), inside)  # taps from ``end`` on read zeros after the input
            if history >= 0 and inside > 0:
                kept = history + (pad + start) * input_dim
                _product(carry[s, kept:kept + inside * input_dim], matrix, 0, dots, acc)
            if end > inside:
                _product(packed[s, (start + inside) * input_dim:(start + end) * input_dim], matrix,
                         inside * input_dim, dots, acc)


@njit(**KERNEL_FLAGS)
def _tap_products(x, samples, rows, kernel, strides, dilation, pad, out_rows, carry, history, out):
    """out[s, t, group(f)] += x[s, t * strides + k * dilation - pad, channels of the group] @ kernel[g, k]
    for every (group, tap) as one product shared by the output rows that read inside the input,
    and, for a stream, by those that read the kept rows before row 0.

    kernel: (G, K, I / G, F / G)
    """
    prefer_wide_vectors()
    groups, taps, group_in, group_out = kernel.shape[0], kernel.shape[1], kernel.shape[2], kernel.shape[3]
    input_dim = groups * group_in
    dim = x.shape[2]
    flat = x.reshape((x.shape[0], x.shape[1] * dim))  # (S, T * D)
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
            _shared_products(flat, samples, first, stop, shift * dim + c0, strides * dim, matrix, False, out, f0)


@njit(**KERNEL_FLAGS)
def _shared_products(source, samples, first, stop, base, step, matrix, dots, out, f0):
    """out[s, t, f0:f0 + N] += source[s, base + t * step:base + t * step + R] @ the (R, N) matrix, for
    every s < samples and first <= t < stop, four (s, t) rows sharing each load of the matrix.

    source: (S, >=base + (stop - 1) * step + R)   C-contiguous
    matrix: (N, R) if ``dots``, else (R, N)
    out:    (S, >=stop, >=f0 + N)                  C-contiguous
    """
    prefer_wide_vectors()
    length, width = (matrix.shape[1], matrix.shape[0]) if dots else (matrix.shape[0], matrix.shape[1])
    span = stop - first
    if span <= 0:
        return
    total = samples * span
    q = 0
    while q + 4 <= total:
        s0, t0, s1, t1, s2, t2, s3, t3 = four_rows(q, span)
        t0, t1, t2, t3 = t0 + first, t1 + first, t2 + first, t3 + first
        a0, a1, a2, a3 = base + t0 * step, base + t1 * step, base + t2 * step, base + t3 * step
        v0, v1 = source[s0, a0:a0 + length], source[s1, a1:a1 + length]  # (R,)
        v2, v3 = source[s2, a2:a2 + length], source[s3, a3:a3 + length]  # (R,)
        acc0, acc1 = out[s0, t0][f0:f0 + width], out[s1, t1][f0:f0 + width]  # (N,)
        acc2, acc3 = out[s2, t2][f0:f0 + width], out[s3, t3][f0:f0 + width]  # (N,)
        if dots:
            _dots4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3)
        else:
            accumulate_matvec4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3)
        q += 4
    while q < total:
        s0, t0 = divmod(q, span)
        t0 += first
        a0 = base + t0 * step
        _product(source[s0, a0:a0 + length], matrix, 0, dots, out[s0, t0][f0:f0 + width])
        q += 1


@njit(**KERNEL_FLAGS)
def _product(v, matrix, row, dots, acc):
    """acc += v @ rows [row, row + R) of the (K * I, N) matrix, which is stored transposed if ``dots``.

    v: (R,); matrix: (N, >=row + R) if ``dots``, else (>=row + R, N); acc: (N,)
    """
    prefer_wide_vectors()
    length = v.shape[0]
    if not dots:
        accumulate_matvec(v, matrix[row:row + length], acc)
        return
    for j in range(acc.shape[0]):
        weights = matrix[j, row:row + length]  # (R,)
        total = ZERO
        for i in range(length):
            total += v[i] * weights[i]
        acc[j] += total


@njit(**KERNEL_FLAGS)
def _dots4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3):
    """acc_s[j] += v_s . matrix[j] for four rows at once: each load of the matrix feeds four sums.

    v_s: (R,); matrix: (N, R); acc_s: (N,)
    """
    prefer_wide_vectors()
    length = matrix.shape[1]
    for j in range(matrix.shape[0]):
        weights = matrix[j]  # (R,)
        total0, total1, total2, total3 = ZERO, ZERO, ZERO, ZERO
        for i in range(length):
            m = weights[i]
            total0 += v0[i] * m
            total1 += v1[i] * m
            total2 += v2[i] * m
            total3 += v3[i] * m
        acc0[j] += total0
        acc1[j] += total1
        acc2[j] += total2
        acc3[j] += total3


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
