"""Numba kernels: plain arrays and ints in, results written into arrays the caller allocated.

The kernels know nothing of layers or files. ``gru_engine.runtime`` packs a validated model into a
*plan* (one int64 row per layer) and one float32 weight buffer, so a whole forward pass is a single
compiled call, whatever the model.

GRU step (Keras; gates z, r, h; ``x_*`` the input projection, ``R_*`` the recurrent kernel columns):

    z  = recurrent_activation(x_z + h @ R_z + b_z)
    r  = recurrent_activation(x_r + h @ R_r + b_r)
    reset_after=True:   hh = activation(x_h + r * (h @ R_h + b_h))
    reset_after=False:  hh = activation(x_h + (r * h) @ R_h)
    h' = z * h + (1 - z) * hh

where ``x_g = x @ kernel_g + input_bias_g`` and ``b_g`` is the recurrent bias (zero when reset_after
is False, where Keras has a single bias on the input side).
"""

import math

import numpy as np
from numba import njit, prange

from ._flags import KERNEL_FLAGS, PARALLEL_KERNEL_FLAGS

# Layer kinds in column 0 of a plan row.
KIND_MASKING = 0
KIND_GRU = 1
KIND_BIDIRECTIONAL = 2
KIND_DENSE = 3

ACTIVATION_CODES = {"linear": 0, "tanh": 1, "sigmoid": 2, "hard_sigmoid": 3, "relu": 4, "softmax": 5}
MERGE_CODES = {"concat": 0, "sum": 1, "mul": 2, "ave": 3, None: 4}  # None: written as concat

# Plan row layout. Every row: kind, input_dim, output_dim, then kind-specific columns.
PLAN_WIDTH = 32
COL_KIND, COL_IN, COL_OUT = 0, 1, 2
# masking: weight offset of mask_value
COL_MASK_VALUE = 3
# dense: activation, kernel offset, bias offset
COL_DENSE_ACTIVATION, COL_DENSE_KERNEL, COL_DENSE_BIAS = 3, 4, 5
# gru and bidirectional: merge mode, then one GRU block (forward), then a second (backward)
COL_MERGE = 3
GRU_BLOCK = (
    "units", "activation", "recurrent_activation", "reset_after", "go_backwards", "return_sequences",
    "zero_output_for_mask", "kernel", "recurrent_kernel", "input_bias", "recurrent_bias", "carry",
)
BLOCK_WIDTH = len(GRU_BLOCK)
COL_FORWARD, COL_BACKWARD = 4, 4 + BLOCK_WIDTH
(G_UNITS, G_ACT, G_REC_ACT, G_RESET_AFTER, G_GO_BACKWARDS, G_RETURN_SEQUENCES, G_ZERO_OUTPUT,
 G_KERNEL, G_RECURRENT_KERNEL, G_INPUT_BIAS, G_RECURRENT_BIAS, G_CARRY) = range(BLOCK_WIDTH)


@njit(**KERNEL_FLAGS)
def activate(buf, start, stop, code):
    """Apply activation ``code`` to buf[start:stop] in place; branch once, then a plain loop."""
    if code == 1:
        for j in range(start, stop):
            buf[j] = math.tanh(buf[j])
    elif code == 2:
        for j in range(start, stop):
            buf[j] = 0.5 * math.tanh(0.5 * buf[j]) + 0.5
    elif code == 3:
        for j in range(start, stop):
            buf[j] = min(max(buf[j] / np.float32(6.0) + np.float32(0.5), np.float32(0.0)), np.float32(1.0))
    elif code == 4:
        for j in range(start, stop):
            buf[j] = max(buf[j], np.float32(0.0))
    elif code == 5:
        peak = buf[start]
        for j in range(start, stop):
            peak = max(peak, buf[j])
        total = np.float32(0.0)
        for j in range(start, stop):
            buf[j] = math.exp(buf[j] - peak)
            total += buf[j]
        for j in range(start, stop):
            buf[j] = buf[j] / total


@njit(**KERNEL_FLAGS)
def project(x, rows, kernel, bias, out):
    """out[t] = x[t] @ kernel + bias for t < rows.

    x:      (>=rows, I)
    kernel: (I, N)
    bias:   (N,)
    out:    (>=rows, N)
    """
    n_in = kernel.shape[0]
    n_out = kernel.shape[1]
    for t in range(rows):
        acc = out[t]  # (N,)
        acc[:] = bias
        for i in range(n_in):
            xi = x[t, i]
            for j in range(n_out):
                acc[j] += xi * kernel[i, j]


@njit(**KERNEL_FLAGS)
def gru_layer(x, steps, kernel, recurrent_kernel, input_bias, recurrent_bias, activation,
              recurrent_activation, reset_after, go_backwards, zero_output_for_mask, mask, masked,
              h, xw, gates, out, time_ordered_output):
    """Run one GRU direction over ``steps`` time steps of one sample.

    x:                (>=steps, I)  layer input in time order
    kernel:           (I, 3H)       columns z | r | h
    recurrent_kernel: (H, 3H)       columns z | r | h
    input_bias:       (3H,)
    recurrent_bias:   (3H,)         zeros when reset_after is False
    mask:             (>=steps,)    1.0 keep, 0.0 skip; read only when ``masked``
    h:                (H,)          carry, read as the initial state and updated in place
    xw:               (>=steps, 3H) scratch for the input projection
    gates:            (3H,)         scratch
    out:              (>=steps, H)  output after each step: in processing order (Keras go_backwards),
                                    or in time order when ``time_ordered_output`` (Bidirectional)
    """
    units = h.shape[0]
    # The input projection has no time dependency: one pass before the recurrent loop.
    project(x, steps, kernel, input_bias, xw)
    for s in range(steps):
        t = steps - 1 - s if go_backwards else s
        o = t if time_ordered_output else s
        if masked and mask[t] == 0.0:
            # Keras skips masked steps: the carry passes through, the output repeats it (or is zero).
            for j in range(units):
                out[o, j] = 0.0 if zero_output_for_mask else h[j]
            continue
        xt = xw[t]  # (3H,)
        if reset_after:
            gates[:] = recurrent_bias
            for i in range(units):
                hi = h[i]
                for j in range(3 * units):
                    gates[j] += hi * recurrent_kernel[i, j]
            for j in range(2 * units):
                gates[j] += xt[j]
            activate(gates, 0, 2 * units, recurrent_activation)
            for j in range(units):
                gates[2 * units + j] = xt[2 * units + j] + gates[units + j] * gates[2 * units + j]
        else:
            gates[:2 * units] = xt[:2 * units]
            for i in range(units):
                hi = h[i]
                for j in range(2 * units):
                    gates[j] += hi * recurrent_kernel[i, j]
            activate(gates, 0, 2 * units, recurrent_activation)
            gates[2 * units:] = xt[2 * units:]
            for i in range(units):
                rh = gates[units + i] * h[i]
                for j in range(units):
                    gates[2 * units + j] += rh * recurrent_kernel[i, 2 * units + j]
        activate(gates, 2 * units, 3 * units, activation)
        for j in range(units):
            z = gates[j]
            h[j] = z * h[j] + (1.0 - z) * gates[2 * units + j]
            out[o, j] = h[j]


@njit(**KERNEL_FLAGS)
def gru_block(row, col, weights, input_dim, x, steps, mask, masked, carry, xw, gates, out,
              time_ordered_output):
    """Run the GRU described by plan row columns col.. (one direction of a layer)."""
    units = row[col + G_UNITS]
    three = 3 * units
    k = row[col + G_KERNEL]
    r = row[col + G_RECURRENT_KERNEL]
    ib = row[col + G_INPUT_BIAS]
    rb = row[col + G_RECURRENT_BIAS]
    c = row[col + G_CARRY]
    gru_layer(
        x, steps,
        weights[k:k + input_dim * three].reshape((input_dim, three)),
        weights[r:r + units * three].reshape((units, three)),
        weights[ib:ib + three], weights[rb:rb + three],
        row[col + G_ACT], row[col + G_REC_ACT], row[col + G_RESET_AFTER] != 0,
        row[col + G_GO_BACKWARDS] != 0, row[col + G_ZERO_OUTPUT] != 0, mask, masked,
        carry[c:c + units], xw[:, :three], gates[:three], out, time_ordered_output,
    )
    return units, row[col + G_RETURN_SEQUENCES] != 0


@njit(**KERNEL_FLAGS)
def run_sample(plan, weights, x, carry, work, max_dim, max_three, out):
    """Run the whole chain on one sample.

    plan:    (L, PLAN_WIDTH) int64
    weights: (W,)            float32, every layer's tensors packed
    x:       (T, F)          input
    carry:   (C,)            every GRU direction's carry, read as initial state, left as final state
    work:    (K,)            scratch, see ``workspace_size``
    out:     (rows * D,)     the last layer's output, rows = T for sequences, else 1
    """
    steps = x.shape[0]
    size = steps * max_dim
    current = work[:size].reshape((steps, max_dim))             # (T, Dmax)
    following = work[size:2 * size].reshape((steps, max_dim))   # (T, Dmax)
    offset = 2 * size
    xw = work[offset:offset + steps * max_three].reshape((steps, max_three))  # (T, 3Hmax)
    offset += steps * max_three
    gates = work[offset:offset + max_three]                     # (3Hmax,)
    offset += max_three
    mask = work[offset:offset + steps]                          # (T,)
    offset += steps
    backward = work[offset:offset + size].reshape((steps, max_dim))  # (T, Dmax)

    current[:, :x.shape[1]] = x
    rows = steps
    masked = False
    for layer in range(plan.shape[0]):
        row = plan[layer]
        kind = row[COL_KIND]
        input_dim = row[COL_IN]
        output_dim = row[COL_OUT]
        source = current[:rows, :input_dim]
        if kind == KIND_MASKING:
            mask_value = weights[row[COL_MASK_VALUE]]
            for t in range(rows):
                keep = False
                for f in range(input_dim):
                    if source[t, f] != mask_value:
                        keep = True
                mask[t] = 1.0 if keep else 0.0
                if not keep:
                    source[t, :] = 0.0
            masked = True
            continue
        if kind == KIND_DENSE:
            k = row[COL_DENSE_KERNEL]
            b = row[COL_DENSE_BIAS]
            project(source, rows, weights[k:k + input_dim * output_dim].reshape((input_dim, output_dim)),
                    weights[b:b + output_dim], following[:, :output_dim])
            for t in range(rows):
                activate(following[t], 0, output_dim, row[COL_DENSE_ACTIVATION])
        elif kind == KIND_GRU:
            units, sequences = gru_block(row, COL_FORWARD, weights, input_dim, source, rows, mask,
                                         masked, carry, xw, gates, following, False)
            if not sequences:
                following[0, :units] = following[rows - 1, :units]
                rows = 1
                masked = False
        else:
            merge = row[COL_MERGE]
            forward_units, sequences = gru_block(row, COL_FORWARD, weights, input_dim, source, rows,
                                                 mask, masked, carry, xw, gates, following, False)
            backward_units, _ = gru_block(row, COL_BACKWARD, weights, input_dim, source, rows, mask,
                                          masked, carry, xw, gates, backward, True)
            if not sequences:
                # The last outputs are the final carries: forward at t=T-1, backward at t=0.
                following[0, :forward_units] = following[rows - 1, :forward_units]
                rows = 1
                masked = False
            for t in range(rows):
                if merge == 0 or merge == 4:
                    following[t, forward_units:forward_units + backward_units] = backward[t, :backward_units]
                elif merge == 1:
                    for j in range(forward_units):
                        following[t, j] += backward[t, j]
                elif merge == 2:
                    for j in range(forward_units):
                        following[t, j] *= backward[t, j]
                else:
                    for j in range(forward_units):
                        following[t, j] = 0.5 * (following[t, j] + backward[t, j])
        current, following = following, current
    width = plan[plan.shape[0] - 1, COL_OUT]
    for t in range(rows):
        out[t * width:(t + 1) * width] = current[t, :width]


@njit(**KERNEL_FLAGS)
def count_nonfinite(x):
    """How many samples of x (B, T, F) hold a NaN or infinity."""
    bad = 0
    for b in range(x.shape[0]):
        for value in x[b].ravel():
            if not math.isfinite(value):
                bad += 1
                break
    return bad


@njit(**KERNEL_FLAGS)
def run_batch(plan, weights, x, carry, work, max_dim, max_three, out):
    """run_sample over the batch, one sample after another.

    x: (B, T, F), carry: (B, C), work: (B, K), out: (B, rows * D)
    Returns how many samples are not finite; then nothing is run, so no carry changes half-way.
    """
    bad = count_nonfinite(x)
    if bad == 0:
        for b in range(x.shape[0]):
            run_sample(plan, weights, x[b], carry[b], work[b], max_dim, max_three, out[b])
    return bad


@njit(**PARALLEL_KERNEL_FLAGS)
def run_batch_parallel(plan, weights, x, carry, work, max_dim, max_three, out):
    """run_batch with samples spread over Numba's threads: samples are independent sequences."""
    bad = count_nonfinite(x)
    if bad == 0:
        for b in prange(x.shape[0]):
            run_sample(plan, weights, x[b], carry[b], work[b], max_dim, max_three, out[b])
    return bad


def workspace_size(steps, max_dim, max_three):
    """Floats of scratch run_sample needs per sample."""
    return 3 * steps * max_dim + steps * max_three + max_three + steps
