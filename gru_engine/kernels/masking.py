"""The Masking layer: which time steps the recurrent layers after it skip."""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import ONE, ZERO


@njit(**KERNEL_FLAGS)
def mask_steps(x, samples, rows, input_dim, mask_value, mask):
    """Keras Masking: a step is skipped when every feature equals ``mask_value``; its input is zeroed.

    x:    (S, >=rows, >=I) layer input, masked steps zeroed in place
    mask: (S, >=rows)      1.0 keep, 0.0 skip
    """
    prefer_wide_vectors()
    for s in range(samples):
        for t in range(rows):
            keep = False
            for f in range(input_dim):
                if x[s, t, f] != mask_value:
                    keep = True
            mask[s, t] = ONE if keep else ZERO
            if not keep:
                for f in range(input_dim):
                    x[s, t, f] = ZERO


@njit(**KERNEL_FLAGS)
def mask_lengths(lengths, samples, rows, mask, combine):
    """Per-sample lengths as a mask: step t of sample s is kept when t < lengths[s] (trailing padding).

    lengths: (S,) int64, checked to lie in [1, rows]
    mask:    (S, >=rows) 1.0 keep, 0.0 skip; with ``combine``, ANDed with what it holds (a Masking
             layer's mask), else overwritten
    """
    prefer_wide_vectors()
    for s in range(samples):
        length = lengths[s]
        for t in range(rows):
            keep = t < length and (not combine or mask[s, t] != ZERO)
            mask[s, t] = ONE if keep else ZERO
