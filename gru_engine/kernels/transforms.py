"""A bundle's input/output transform steps that are not folded into the weights, run in the kernel.

Each step is one plan row (see ``plan``), applied in place to the values between layers:

    AFFINE         x = x * scale + offset          per feature
    LOG            x = log(x)
    CENTER         x = x - mean_t(x)                per sample and feature, over the window; the
                                                    means are kept for UNCENTER
    INVERT_AFFINE  y = (y - offset) / scale         per output
    EXP            y = exp(y)
    UNCENTER       y = y + mean[feature[d]]         the means a CENTER step kept

Each step computes in float64 and rounds once to float32, as NumPy's float64 pipeline would per step.
"""

import math

import numpy as np
from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors

# Step kinds, as plan row kinds: apart from the layer kinds, which count up from 0.
AFFINE, LOG, CENTER, INVERT_AFFINE, EXP, UNCENTER = range(16, 22)
FIRST_STEP = AFFINE
# A step's columns in its plan row, after kind, input_dim and output_dim: how many leading values
# of each row it applies to (an output step: the main output's width), the weight offsets of its two
# parameter vectors (scale and offset; UNCENTER: its feature indices), and for CENTER and UNCENTER
# the slot of the kept means.
STEP_COLUMNS = ("width", "first", "second", "slot")
STEP_WIDTH = len(STEP_COLUMNS)
S_WIDTH, S_FIRST, S_SECOND, S_SLOT = range(STEP_WIDTH)


@njit(**KERNEL_FLAGS)
def transform_step(kind, row, col, weights, x, samples, rows, means):
    """Apply one step to x[s, t, :width] for s < samples, t < rows.

    row:   (PLAN_WIDTH,) int64 plan row; its step columns start at ``col``
    x:     (S, >=rows, >=width) values, in place
    means: (S, slots, >=F) the means CENTER steps keep, by slot
    Returns False if a LOG step met a value <= 0 (its output is then NaN or -inf).
    """
    prefer_wide_vectors()
    width = row[col + S_WIDTH]
    first = row[col + S_FIRST]
    second = row[col + S_SECOND]
    ok = True
    if kind == AFFINE or kind == INVERT_AFFINE:
        scale = weights[first:first + width]     # (W,)
        offset = weights[second:second + width]  # (W,)
        for s in range(samples):
            for t in range(rows):
                v = x[s, t]  # (>=W,)
                for j in range(width):
                    if kind == AFFINE:
                        v[j] = np.float32(np.float64(v[j]) * scale[j] + offset[j])
                    else:
                        v[j] = np.float32((np.float64(v[j]) - offset[j]) / scale[j])
    elif kind == LOG:
        for s in range(samples):
            for t in range(rows):
                v = x[s, t]
                for j in range(width):
                    ok &= v[j] > 0
                    v[j] = np.float32(math.log(np.float64(v[j]))) if v[j] > 0 else np.float32(np.nan)
    elif kind == EXP:
        for s in range(samples):
            for t in range(rows):
                v = x[s, t]
                for j in range(width):
                    v[j] = np.float32(math.exp(np.float64(v[j])))
    elif kind == CENTER:
        slot = row[col + S_SLOT]
        for s in range(samples):
            mean = means[s, slot]  # (>=W,)
            for j in range(width):
                total = 0.0
                for t in range(rows):
                    total += np.float64(x[s, t, j])
                mean[j] = np.float32(total / rows)
                for t in range(rows):
                    x[s, t, j] = np.float32(np.float64(x[s, t, j]) - total / rows)
    else:
        slot = row[col + S_SLOT]
        features = weights[first:first + width]  # (W,) input feature indices, exact in float32
        for s in range(samples):
            mean = means[s, slot]
            for t in range(rows):
                v = x[s, t]
                for j in range(width):
                    v[j] = np.float32(np.float64(v[j]) + mean[np.int64(features[j])])
    return ok
