"""Pooling over time (Keras MaxPooling1D, AveragePooling1D, GlobalAveragePooling1D, GlobalMaxPooling1D)
and the inference form of BatchNormalization, a per-channel affine map.

Windowed pooling: y[t, c] = max or mean of x[i, c] over i in [t * strides - pad_left,
t * strides - pad_left + pool_size) within [0, rows): padded positions never count, as TensorFlow
pools (AveragePooling1D with 'same' divides by the steps inside the input).
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import ONE, ZERO
from .conv import left_padding, window_rows


@njit(**KERNEL_FLAGS)
def pool1d_layer(x, samples, rows, dim, size, strides, padding, is_max, out):
    """Windowed max or average pooling; returns the number of output rows.

    x:   (S, >=rows, >=D)
    out: (S, >=out_rows, >=D) C-contiguous
    """
    prefer_wide_vectors()
    out_rows = window_rows(rows, size, strides, padding)
    pad = left_padding(rows, size, strides, padding, out_rows)
    for s in range(samples):
        for t in range(out_rows):
            start = max(t * strides - pad, 0)
            stop = min(t * strides - pad + size, rows)
            row = out[s, t]  # (>=D,)
            first = x[s, start]  # (>=D,)
            for c in range(dim):
                row[c] = first[c]
            for i in range(start + 1, stop):
                source = x[s, i]  # (>=D,)
                if is_max:
                    for c in range(dim):
                        row[c] = max(row[c], source[c])
                else:
                    for c in range(dim):
                        row[c] += source[c]
            if not is_max:
                inverse = ONE / (stop - start)
                for c in range(dim):
                    row[c] *= inverse
    return out_rows


@njit(**KERNEL_FLAGS)
def global_pool_layer(x, samples, rows, dim, mask, masked, is_max, out):
    """Pool every row into out[s, 0]: the max over all rows, or the mean over the unmasked ones.

    x:    (S, >=rows, >=D)
    mask: (S, >=rows)  1.0 keep, 0.0 skip; read only when ``masked`` (average only, as Keras)
    out:  (S, >=1, >=D)
    A sample whose every step is masked averages 0 / 0 = NaN, as Keras does.
    """
    prefer_wide_vectors()
    for s in range(samples):
        row = out[s, 0]  # (>=D,)
        first = x[s, 0]  # (>=D,)
        if is_max:
            for c in range(dim):
                row[c] = first[c]
            for t in range(1, rows):
                source = x[s, t]
                for c in range(dim):
                    row[c] = max(row[c], source[c])
            continue
        count = ZERO
        for c in range(dim):
            row[c] = ZERO
        for t in range(rows):
            weight = mask[s, t] if masked else ONE
            count += weight
            if weight != ZERO:
                source = x[s, t]
                for c in range(dim):
                    row[c] += source[c]
        for c in range(dim):
            row[c] = row[c] / count


@njit(**KERNEL_FLAGS)
def affine_layer(x, samples, rows, dim, scale, shift, out):
    """BatchNormalization at inference: out[s, t, c] = x[s, t, c] * scale[c] + shift[c].

    x: (S, >=rows, >=D); scale, shift: (D,); out: (S, >=rows, >=D)
    """
    prefer_wide_vectors()
    for s in range(samples):
        for t in range(rows):
            source = x[s, t]  # (>=D,)
            row = out[s, t]   # (>=D,)
            for c in range(dim):
                row[c] = source[c] * scale[c] + shift[c]
