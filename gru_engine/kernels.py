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

from ._flags import KERNEL_FLAGS, PARALLEL_KERNEL_FLAGS, prefer_wide_vectors

# Layer kinds in column 0 of a plan row.
KIND_MASKING = 0
KIND_GRU = 1
KIND_BIDIRECTIONAL = 2
KIND_DENSE = 3

# Samples run in lockstep, sharing each weight load (batch mode).
BLOCK = 4
# Time steps whose input projection is computed together, just before the recurrence reaches them:
# enough rows to share kernel loads four at a time, few enough to stay in L1 (measured GRU(256),
# T=1000: 3.7% faster than projecting the whole sequence first, whose scratch also grew with T).
PROJECT_AHEAD = 8
# Gate rows are padded with zero columns to a multiple of this many floats, so the vectorised loops
# over them have no scalar remainder (measured: 50x150 matvec 284 ns, padded to 160: 232 ns).
LANES = 16

LINEAR, TANH, SIGMOID, HARD_SIGMOID, RELU, SOFTMAX = range(6)
ACTIVATION_CODES = {"linear": LINEAR, "tanh": TANH, "sigmoid": SIGMOID, "hard_sigmoid": HARD_SIGMOID,
                    "relu": RELU, "softmax": SOFTMAX}
# What a GRU emits at a masked step. Keras: zeros with zero_output_for_mask, else its previous
# output in this call (zeros before the first unmasked step, whatever the initial state). A stream
# emits the carry instead, so each step equals predict() on the whole prefix.
MASKED_ZERO, MASKED_PREVIOUS, MASKED_CARRY = 0, 1, 2
MERGE_CONCAT, MERGE_SUM, MERGE_MUL, MERGE_AVE, MERGE_NONE = range(5)
MERGE_CODES = {"concat": MERGE_CONCAT, "sum": MERGE_SUM, "mul": MERGE_MUL,
               "ave": MERGE_AVE, None: MERGE_NONE}  # None: written as concat, split on return

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
    "masked_output", "kernel", "recurrent_kernel", "input_bias", "recurrent_bias", "carry",
)
BLOCK_WIDTH = len(GRU_BLOCK)
COL_FORWARD, COL_BACKWARD = 4, 4 + BLOCK_WIDTH
(G_UNITS, G_ACT, G_REC_ACT, G_RESET_AFTER, G_GO_BACKWARDS, G_RETURN_SEQUENCES, G_MASKED_OUTPUT,
 G_KERNEL, G_RECURRENT_KERNEL, G_INPUT_BIAS, G_RECURRENT_BIAS, G_CARRY) = range(BLOCK_WIDTH)


# tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (beyond, float32 tanh is +-1 within 3e-8). Coefficients
# fitted for this project (iteratively reweighted least squares): max error 2e-8 in float64.
# The polynomials are evaluated in float64, because GRU recurrences amplify per-step rounding
# (evaluated in float32 the error was 3.2e-7, and parity with Keras failed on expansive models).
# The divide is float32: 1.4e-7 in all (TensorFlow's own float32 tanh: 3.4e-7, measured here),
# and it was the bottleneck: a float64 divide has a third of the throughput (airline window 3-10%
# faster). libm's tanh is a scalar call (~15 ns) that blocks vectorisation.
TANH_CLAMP = 9.0
P0, P1, P2, P3, P4, P5 = (
    9.99999908e-01, 1.36261799e-01, 3.80222599e-03, 2.67446258e-05, 2.78178600e-08, -1.03821162e-11)
Q0, Q1, Q2, Q3, Q4 = (1.0, 4.69594857e-01, 2.70007688e-02, 3.82464926e-04, 1.20278291e-06)
ONE = np.float32(1.0)
HALF = np.float32(0.5)
ZERO = np.float32(0.0)
SIXTH = np.float32(1.0 / 6.0)


@njit(**KERNEL_FLAGS)
def padded(n):
    """n rounded up to a multiple of LANES: the stored row width of a gate matrix of n columns."""
    return (n + LANES - 1) // LANES * LANES


@njit(inline="always", **KERNEL_FLAGS)
def fast_tanh(v):
    x = min(max(np.float64(v), -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = ((((P5 * x2 + P4) * x2 + P3) * x2 + P2) * x2 + P1) * x2 + P0
    q = (((Q4 * x2 + Q3) * x2 + Q2) * x2 + Q1) * x2 + Q0
    return min(max(np.float32(x * p) / np.float32(q), -ONE), ONE)


@njit(**KERNEL_FLAGS)
def activate(buf, code):
    """Apply activation ``code`` to buf (N,) in place; branch once, then a plain loop.

    Loops index from 0 with no offsets: an offset index would carry Numba's negative-index
    wraparound check into the loop and stop LLVM from vectorising it.
    """
    prefer_wide_vectors()
    n = buf.shape[0]
    if code == TANH:
        for j in range(n):
            buf[j] = fast_tanh(buf[j])
    elif code == SIGMOID:
        # sigmoid(x) = (tanh(x/2) + 1) / 2, exactly; shares the vectorised tanh.
        for j in range(n):
            buf[j] = HALF * fast_tanh(HALF * buf[j]) + HALF
    elif code == HARD_SIGMOID:
        # Keras 3 hard_sigmoid: clip(x / 6 + 0.5, 0, 1).
        for j in range(n):
            buf[j] = min(max(buf[j] * SIXTH + HALF, ZERO), ONE)
    elif code == RELU:
        for j in range(n):
            buf[j] = max(buf[j], ZERO)
    elif code == SOFTMAX:
        peak = buf[0]
        for j in range(n):
            peak = max(peak, buf[j])
        total = ZERO
        for j in range(n):
            buf[j] = math.exp(buf[j] - peak)
            total += buf[j]
        for j in range(n):
            buf[j] = buf[j] / total


@njit(**KERNEL_FLAGS)
def accumulate_matvec(v, matrix, acc):
    """acc += v @ matrix, eight rows of the matrix per pass.

    v:      (R,)
    matrix: (R, N)
    acc:    (N,)
    Eight rows at once keep each acc element in a register across them: an eighth of the loads
    and stores of a plain axpy loop, whose acc traffic dominates at batch 1.
    """
    prefer_wide_vectors()
    rows = v.shape[0]
    width = matrix.shape[1]
    i = 0
    while i + 8 <= rows:
        v0, v1, v2, v3, v4, v5, v6, v7 = v[i], v[i + 1], v[i + 2], v[i + 3], v[i + 4], v[i + 5], v[i + 6], v[i + 7]
        m0, m1, m2, m3 = matrix[i], matrix[i + 1], matrix[i + 2], matrix[i + 3]
        m4, m5, m6, m7 = matrix[i + 4], matrix[i + 5], matrix[i + 6], matrix[i + 7]
        for j in range(width):
            acc[j] += ((v0 * m0[j] + v1 * m1[j]) + (v2 * m2[j] + v3 * m3[j])) \
                + ((v4 * m4[j] + v5 * m5[j]) + (v6 * m6[j] + v7 * m7[j]))
        i += 8
    while i < rows:
        vi = v[i]
        mi = matrix[i]
        for j in range(width):
            acc[j] += vi * mi[j]
        i += 1


@njit(**KERNEL_FLAGS)
def accumulate_matvec4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3):
    """acc_s += v_s @ matrix for four samples at once, four rows of the matrix per pass.

    v_s:    (R,)
    matrix: (R, N)
    acc_s:  (N,)
    Each matrix load feeds four samples: at batch size >= 4 this halves the loads per FMA
    (measured 50x160: 944 -> 674 ns for four samples; 256x768: 31 -> 14 us).
    """
    prefer_wide_vectors()
    rows = matrix.shape[0]
    width = matrix.shape[1]
    i = 0
    while i + 4 <= rows:
        a0, a1, a2, a3 = v0[i], v0[i + 1], v0[i + 2], v0[i + 3]
        b0, b1, b2, b3 = v1[i], v1[i + 1], v1[i + 2], v1[i + 3]
        c0, c1, c2, c3 = v2[i], v2[i + 1], v2[i + 2], v2[i + 3]
        d0, d1, d2, d3 = v3[i], v3[i + 1], v3[i + 2], v3[i + 3]
        n0, n1, n2, n3 = matrix[i], matrix[i + 1], matrix[i + 2], matrix[i + 3]
        for j in range(width):
            m0, m1, m2, m3 = n0[j], n1[j], n2[j], n3[j]
            acc0[j] += (a0 * m0 + a1 * m1) + (a2 * m2 + a3 * m3)
            acc1[j] += (b0 * m0 + b1 * m1) + (b2 * m2 + b3 * m3)
            acc2[j] += (c0 * m0 + c1 * m1) + (c2 * m2 + c3 * m3)
            acc3[j] += (d0 * m0 + d1 * m1) + (d2 * m2 + d3 * m3)
        i += 4
    while i < rows:
        n0 = matrix[i]
        a0, b0, c0, d0 = v0[i], v1[i], v2[i], v3[i]
        for j in range(width):
            acc0[j] += a0 * n0[j]
            acc1[j] += b0 * n0[j]
            acc2[j] += c0 * n0[j]
            acc3[j] += d0 * n0[j]
        i += 1


@njit(**KERNEL_FLAGS)
def accumulate_rows(samples, v, matrix, acc, start):
    """acc[s, start:start + N] += v[s, :R] @ matrix for each sample s < samples.

    v:      (S, >=R)     C-contiguous
    matrix: (R, N)
    acc:    (S, >=start + N) C-contiguous
    """
    prefer_wide_vectors()
    rows = matrix.shape[0]
    stop = start + matrix.shape[1]
    if samples == BLOCK:
        accumulate_matvec4(v[0][:rows], v[1][:rows], v[2][:rows], v[3][:rows], matrix,
                           acc[0][start:stop], acc[1][start:stop], acc[2][start:stop], acc[3][start:stop])
    else:
        for s in range(samples):
            accumulate_matvec(v[s][:rows], matrix, acc[s][start:stop])


@njit(**KERNEL_FLAGS)
def project(x, samples, rows, input_dim, kernel, bias, out):
    """out[s, t, :N] = x[s, t, :I] @ kernel + bias for s < samples, t < rows.

    x:      (S, >=rows, >=I)
    kernel: (I, N)
    bias:   (N,)
    out:    (S, >=rows, >=N) C-contiguous
    Rows have no dependency on each other, so four (sample, time) rows share each kernel load,
    even for a single sample.
    """
    prefer_wide_vectors()
    n_out = kernel.shape[1]
    for s in range(samples):
        for t in range(rows):
            acc = out[s, t]  # (>=N,)
            for j in range(n_out):
                acc[j] = bias[j]
    total = samples * rows
    first = 0
    while first + 4 <= total:
        s0, t0 = divmod(first, rows)
        s1, t1 = divmod(first + 1, rows)
        s2, t2 = divmod(first + 2, rows)
        s3, t3 = divmod(first + 3, rows)
        accumulate_matvec4(x[s0, t0][:input_dim], x[s1, t1][:input_dim], x[s2, t2][:input_dim],
                           x[s3, t3][:input_dim], kernel, out[s0, t0][:n_out], out[s1, t1][:n_out],
                           out[s2, t2][:n_out], out[s3, t3][:n_out])
        first += 4
    while first < total:
        s0, t0 = divmod(first, rows)
        accumulate_matvec(x[s0, t0][:input_dim], kernel, out[s0, t0][:n_out])
        first += 1


@njit(**KERNEL_FLAGS)
def gru_layer(x, samples, steps, input_dim, kernel, recurrent_kernel, input_bias, recurrent_bias, activation,
              recurrent_activation, reset_after, go_backwards, masked_output, mask, masked,
              h, xw, gates, candidate, out, time_ordered_output):
    """Run one GRU direction over ``steps`` time steps of ``samples`` samples in lockstep.

    x:                (S, >=steps, >=I) layer input in time order
    kernel:           (I, P)         columns z | r | h | zero padding, P = padded(3H)
    recurrent_kernel: (H * P,)       reset_after: (H, P) columns z | r | h | zero padding;
                                     else (H, 2H) columns z | r, then (H, H) columns h (split so each
                                     product runs over whole contiguous rows), then unused padding
    input_bias:       (P,)           zero padded; the z and r columns hold input plus recurrent bias
    recurrent_bias:   (P,)           zero padded; only its h columns are read (all zeros when
                                     reset_after is False)
    masked_output:    MASKED_ZERO, MASKED_PREVIOUS or MASKED_CARRY: the output at a skipped step
    mask:             (S, >=steps)   1.0 keep, 0.0 skip; read only when ``masked``
    h:                (S, >=H)       carry, read as the initial state and updated in place
    xw:               (S, >=min(steps, PROJECT_AHEAD), >=P) scratch for the input projection
    gates:            (S, >=P)       scratch: recurrent projection, then z | r | candidate
    candidate:        (S, >=H)       scratch: r * h (reset_after=False)
    out:              (S, >=steps, >=H) output after each step: in processing order (Keras
                                     go_backwards), or in time order when ``time_ordered_output``
    """
    prefer_wide_vectors()
    row_width = kernel.shape[1]    # P
    units = recurrent_kernel.shape[0] // row_width
    two = 2 * units
    three = 3 * units
    # Multiplied by the previous h each step: z | r | h columns, or z | r alone when reset_after is False.
    first_width = row_width if reset_after else two
    recurrent_first = recurrent_kernel[:units * first_width].reshape((units, first_width))  # (H, P) or (H, 2H)
    # Multiplied by r * h; read only when reset_after is False.
    recurrent_h = recurrent_kernel[units * two:units * three].reshape((units, units))     # (H, H)
    # Bit s: sample s has had an unmasked step, so its previous output is its carry (Keras: zero before).
    emitted = (1 << samples) - 1 if masked_output == MASKED_CARRY else 0
    recurrent_h_bias = recurrent_bias[two:row_width]  # (P - 2H,)
    first = 0  # time index of xw's row 0
    for st in range(steps):
        t = steps - 1 - st if go_backwards else st
        o = t if time_ordered_output else st
        if st % PROJECT_AHEAD == 0:
            # The input projection has no time dependency: the next PROJECT_AHEAD steps at once.
            count = min(PROJECT_AHEAD, steps - st)
            first = t - count + 1 if go_backwards else t
            project(x[:, first:first + count], samples, count, input_dim, kernel, input_bias, xw)
        for s in range(samples):
            g = gates[s]          # (>=P,)
            x_t = xw[s, t - first]  # (>=P,)
            # x_z, x_r already hold both biases (summed when packed): the sum starts from them.
            for j in range(two):
                g[j] = x_t[j]
            if reset_after:
                g_h = g[two:row_width]  # (P - 2H,)
                for j in range(row_width - two):
                    g_h[j] = recurrent_h_bias[j]
        accumulate_rows(samples, h, recurrent_first, gates, 0)
        for s in range(samples):
            g = gates[s]          # (>=P,)
            z_r = g[:two]         # (2H,)
            x_t = xw[s, t - first]  # (>=P,)
            activate(z_r, recurrent_activation)
            # Slices, not offset indices (see activate): these loops vectorise only so (measured 3-11%).
            r = g[units:two]          # (H,)
            hh = g[two:three]         # (H,) recurrent h sum, then the candidate's pre-activation
            x_h = x_t[two:three]      # (H,)
            if reset_after:
                for j in range(units):
                    hh[j] = x_h[j] + r[j] * hh[j]
            else:
                hs = h[s]
                rh = candidate[s]
                for j in range(units):
                    rh[j] = r[j] * hs[j]
                    hh[j] = x_h[j]
        if not reset_after:
            accumulate_rows(samples, candidate, recurrent_h, gates, two)
        for s in range(samples):
            hs = h[s]             # (>=H,)
            row = out[s, o]       # (>=H,)
            if masked and mask[s, t] == ZERO:
                # Keras skips masked steps: the carry passes through, the output repeats it (or is zero).
                repeat = (emitted >> s) & 1
                for j in range(units):
                    row[j] = hs[j] if repeat else ZERO
                continue
            if masked_output != MASKED_ZERO:
                emitted |= 1 << s
            g = gates[s]
            hh = g[two:three]     # (H,)
            activate(hh, activation)
            for j in range(units):
                z = g[j]
                hs[j] = z * hs[j] + (ONE - z) * hh[j]
                row[j] = hs[j]


@njit(**KERNEL_FLAGS)
def gru_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates, candidate,
              out, time_ordered_output):
    """Run the GRU described by plan row columns col.. (one direction of a layer).

    carry: (S, C) every direction's carry; hidden: (S, >=H) C-contiguous copy used while running.
    """
    prefer_wide_vectors()
    units = row[col + G_UNITS]
    width = padded(3 * units)
    k = row[col + G_KERNEL]
    r = row[col + G_RECURRENT_KERNEL]
    ib = row[col + G_INPUT_BIAS]
    rb = row[col + G_RECURRENT_BIAS]
    c = row[col + G_CARRY]
    for s in range(samples):
        carried = carry[s, c:c + units]  # (H,)
        for j in range(units):
            hidden[s, j] = carried[j]
    gru_layer(
        x, samples, steps, input_dim,
        weights[k:k + input_dim * width].reshape((input_dim, width)),
        weights[r:r + units * width],
        weights[ib:ib + width], weights[rb:rb + width],
        row[col + G_ACT], row[col + G_REC_ACT], row[col + G_RESET_AFTER] != 0,
        row[col + G_GO_BACKWARDS] != 0, row[col + G_MASKED_OUTPUT], mask, masked,
        hidden, xw, gates, candidate, out, time_ordered_output,
    )
    for s in range(samples):
        carried = carry[s, c:c + units]  # (H,)
        for j in range(units):
            carried[j] = hidden[s, j]
    return units, row[col + G_RETURN_SEQUENCES] != 0


@njit(**KERNEL_FLAGS)
def merge_directions(merge, samples, rows, forward_units, backward_units, forward, backward):
    """Combine a Bidirectional layer's outputs into ``forward`` (Keras merge_mode; None as concat).

    forward:  (S, >=rows, >=D) forward outputs, overwritten by the merged ones
    backward: (S, >=rows, >=H) backward outputs, in time order
    """
    prefer_wide_vectors()
    for s in range(samples):
        for t in range(rows):
            merged = forward[s, t]   # (>=D,)
            other = backward[s, t]   # (>=H,)
            if merge == MERGE_CONCAT or merge == MERGE_NONE:
                appended = merged[forward_units:forward_units + backward_units]  # (H,)
                for j in range(backward_units):
                    appended[j] = other[j]
            elif merge == MERGE_SUM:
                for j in range(forward_units):
                    merged[j] += other[j]
            elif merge == MERGE_MUL:
                for j in range(forward_units):
                    merged[j] *= other[j]
            else:
                for j in range(forward_units):
                    merged[j] = HALF * (merged[j] + other[j])


@njit(**KERNEL_FLAGS)
def run_block(plan, weights, x, carry, work, max_dim, max_gate_width, out):
    """Run the whole chain on a block of up to BLOCK samples in lockstep.

    plan:    (L, PLAN_WIDTH) int64
    weights: (W,)            float32, every layer's tensors packed
    x:       (S, T, F)       input
    carry:   (S, C)          every GRU direction's carry, read as initial state, left as final state
    work:    (K,)            scratch, see ``workspace_size``
    out:     (S, rows * D)   the last layer's output, rows = T for sequences, else 1
    """
    prefer_wide_vectors()
    samples = x.shape[0]
    steps = x.shape[1]
    features = x.shape[2]
    size = samples * steps * max_dim
    block = (samples, steps, max_dim)
    # Every scratch view is C-contiguous, so LLVM knows the strides and vectorises.
    current = work[:size].reshape(block)                          # (S, T, Dmax)
    following = work[size:2 * size].reshape(block)               # (S, T, Dmax)
    backward = work[2 * size:3 * size].reshape(block)             # (S, T, Dmax)
    offset = 3 * size
    ahead = min(steps, PROJECT_AHEAD)
    xw = work[offset:offset + samples * ahead * max_gate_width].reshape((samples, ahead, max_gate_width))  # (S, A, Pmax)
    offset += samples * ahead * max_gate_width
    gates = work[offset:offset + samples * max_gate_width].reshape((samples, max_gate_width))      # (S, Pmax)
    offset += samples * max_gate_width
    candidate = work[offset:offset + samples * max_gate_width].reshape((samples, max_gate_width))  # (S, Pmax)
    offset += samples * max_gate_width
    hidden = work[offset:offset + samples * max_gate_width].reshape((samples, max_gate_width))     # (S, Pmax)
    offset += samples * max_gate_width
    mask = work[offset:offset + samples * steps].reshape((samples, steps))               # (S, T)

    for s in range(samples):
        for t in range(steps):
            for f in range(features):
                current[s, t, f] = x[s, t, f]
    rows = steps
    masked = False
    for layer in range(plan.shape[0]):
        row = plan[layer]
        kind = row[COL_KIND]
        input_dim = row[COL_IN]
        output_dim = row[COL_OUT]
        if kind == KIND_MASKING:
            mask_value = weights[row[COL_MASK_VALUE]]
            for s in range(samples):
                for t in range(rows):
                    keep = False
                    for f in range(input_dim):
                        if current[s, t, f] != mask_value:
                            keep = True
                    mask[s, t] = ONE if keep else ZERO
                    if not keep:
                        for f in range(input_dim):
                            current[s, t, f] = ZERO
            masked = True
            continue
        if kind == KIND_DENSE:
            k = row[COL_DENSE_KERNEL]
            b = row[COL_DENSE_BIAS]
            project(current, samples, rows, input_dim,
                    weights[k:k + input_dim * output_dim].reshape((input_dim, output_dim)),
                    weights[b:b + output_dim], following)
            for s in range(samples):
                for t in range(rows):
                    activate(following[s, t][:output_dim], row[COL_DENSE_ACTIVATION])
        else:
            units, sequences = gru_block(row, COL_FORWARD, weights, input_dim, current, samples, rows, mask,
                                         masked, carry, hidden, xw, gates, candidate, following, False)
            bidirectional = kind == KIND_BIDIRECTIONAL
            if bidirectional:
                backward_units, _ = gru_block(row, COL_BACKWARD, weights, input_dim, current, samples, rows,
                                              mask, masked, carry, hidden, xw, gates, candidate, backward, True)
            if not sequences:
                # Keep the last output: forward at t=T-1 (a Bidirectional's backward one is at t=0).
                for s in range(samples):
                    for j in range(units):
                        following[s, 0, j] = following[s, rows - 1, j]
                rows = 1
                masked = False
            if bidirectional:
                merge_directions(row[COL_MERGE], samples, rows, units, backward_units, following, backward)
        current, following = following, current
    width = plan[plan.shape[0] - 1, COL_OUT]
    for s in range(samples):
        for t in range(rows):
            out_row = out[s, t * width:(t + 1) * width]  # (D,)
            for j in range(width):
                out_row[j] = current[s, t, j]


@njit(**KERNEL_FLAGS)
def count_nonfinite(x):
    """How many samples of x (B, T, F) hold a NaN or infinity."""
    prefer_wide_vectors()
    bad = 0
    for b in range(x.shape[0]):
        finite = True
        for t in range(x.shape[1]):
            for f in range(x.shape[2]):
                finite &= math.isfinite(x[b, t, f])
        bad += not finite
    return bad


@njit(**KERNEL_FLAGS)
def admit(plan, x, carry, zero_carry):
    """What run_batch and run_batch_parallel check before running anything, so no carry changes
    half-way: -1 if x's width is not the plan's input width, else how many samples of x are not
    finite. When that is 0 and ``zero_carry`` is set, carry (B, C) is zeroed (it is then scratch)."""
    prefer_wide_vectors()
    if x.shape[2] != plan[0, COL_IN]:
        return -1
    bad = count_nonfinite(x)
    if bad == 0 and zero_carry:
        carry[:] = ZERO
    return bad


@njit(**KERNEL_FLAGS)
def run_batch(plan, weights, x, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_block over the batch, BLOCK samples after BLOCK samples.

    x: (B, T, F), carry: (B, C), work: (1, K), out: (B, rows * D)
    zero_carry: start from zero state instead of carry's contents.
    Returns ``admit``'s verdict: anything but 0 means nothing ran.
    """
    prefer_wide_vectors()
    bad = admit(plan, x, carry, zero_carry)
    if bad == 0:
        for start in range(0, x.shape[0], BLOCK):
            stop = min(start + BLOCK, x.shape[0])
            run_block(plan, weights, x[start:stop], carry[start:stop], work[0], max_dim, max_gate_width,
                      out[start:stop])
    return bad


@njit(**PARALLEL_KERNEL_FLAGS)
def run_batch_parallel(plan, weights, x, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_batch with blocks spread over Numba's threads: samples are independent sequences.

    work: (ceil(B / BLOCK), K), one scratch per block.
    """
    prefer_wide_vectors()
    bad = admit(plan, x, carry, zero_carry)
    if bad == 0:
        for block in prange((x.shape[0] + BLOCK - 1) // BLOCK):
            start = block * BLOCK
            stop = min(start + BLOCK, x.shape[0])
            run_block(plan, weights, x[start:stop], carry[start:stop], work[block], max_dim, max_gate_width,
                      out[start:stop])
    return bad


def workspace_size(samples, steps, max_dim, max_gate_width):
    """Floats of scratch run_block needs for a block of ``samples`` samples, in whole cache lines
    so that each block's scratch starts on one."""
    ahead = min(steps, PROJECT_AHEAD)
    return padded(samples * (3 * steps * max_dim + ahead * max_gate_width + 3 * max_gate_width + steps))
