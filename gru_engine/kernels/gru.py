"""The GRU layer family: one direction of a GRU over a block of samples in lockstep.

GRU step (Keras; gates z, r, h; ``x_*`` the input projection, ``R_*`` the recurrent kernel columns):

    z  = recurrent_activation(x_z + h @ R_z + b_z)
    r  = recurrent_activation(x_r + h @ R_r + b_r)
    reset_after=True:   hh = activation(x_h + r * (h @ R_h + b_h))
    reset_after=False:  hh = activation(x_h + (r * h) @ R_h)
    h' = z * h + (1 - z) * hh

where ``x_g = x @ kernel_g + input_bias_g`` and ``b_g`` is the recurrent bias (zero when reset_after
is False, where Keras has a single bias on the input side).

Graphs from ONNX may give the activations parameters (alpha, beta) and a cell clip, applied to the
pre-activations of z, r and hh: a block's ``params`` column then points at five floats
[recurrent alpha, recurrent beta, alpha, beta, clip] (see ``activations.activate_with``).
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import ONE, activate, activate_with
from .products import accumulate_rows, padded, shaped
from .recurrent import (B_ACT, B_CARRY, B_GO_BACKWARDS, B_INPUT_BIAS, B_KERNEL, B_MASKED_OUTPUT, B_OPTION,
                        B_PARAMS, B_REC_ACT, B_RECURRENT_BIAS, B_RECURRENT_KERNEL, B_UNITS,
                        MASKED_CARRY, NO_PARAMS, PARAMS_SIZE, carry_in, carry_out,
                        skip_masked_step, project_ahead)


@njit(**KERNEL_FLAGS)
def gru_layer(x, samples, steps, input_dim, kernel, recurrent_kernel, input_bias, recurrent_bias, activation,
              recurrent_activation, reset_after, go_backwards, masked_output, mask, masked,
              h, xw, gates, candidate, out, time_ordered_output, params):
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
    params:           (5,) or (0,)   [recurrent alpha, recurrent beta, alpha, beta, clip], or none
    """
    prefer_wide_vectors()
    row_width = kernel.shape[1]    # P
    units = recurrent_kernel.shape[0] // row_width
    two = 2 * units
    three = 3 * units
    # Multiplied by the previous h each step: z | r | h columns, or z | r alone when reset_after is False.
    first_width = row_width if reset_after else two
    recurrent_first = shaped(recurrent_kernel, 0, (units, first_width))  # (H, P) or (H, 2H)
    # Multiplied by r * h; read only when reset_after is False.
    recurrent_h = shaped(recurrent_kernel, units * two, (units, units))  # (H, H)
    # Bit s: sample s has had an unmasked step, so its previous output is its carry (Keras: zero before).
    emitted = (1 << samples) - 1 if masked_output == MASKED_CARRY else 0
    recurrent_h_bias = recurrent_bias[two:row_width]  # (P - 2H,)
    for st in range(steps):
        t = steps - 1 - st if go_backwards else st
        o = t if time_ordered_output else st
        first = project_ahead(x, samples, st, steps, go_backwards, input_dim, kernel, input_bias, xw)
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
            if params.shape[0]:
                activate_with(z_r, recurrent_activation, params[0], params[1], params[4])
            else:
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
            skipped, emitted = skip_masked_step(masked, mask, s, t, masked_output, emitted, row, hs, units)
            if skipped:
                continue
            g = gates[s]
            hh = g[two:three]     # (H,)
            if params.shape[0]:
                activate_with(hh, activation, params[2], params[3], params[4])
            else:
                activate(hh, activation)
            for j in range(units):
                z = g[j]
                hs[j] = z * hs[j] + (ONE - z) * hh[j]
                row[j] = hs[j]


@njit(**KERNEL_FLAGS)
def gru_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates, candidate,
              out, time_ordered_output):
    """Run the GRU described by plan row columns col.. (one direction block, see ``recurrent``).

    carry: (S, C) every direction's carry; hidden: (S, >=H) C-contiguous copy used while running.
    """
    prefer_wide_vectors()
    units = row[col + B_UNITS]
    width = padded(3 * units)
    k = row[col + B_KERNEL]
    r = row[col + B_RECURRENT_KERNEL]
    ib = row[col + B_INPUT_BIAS]
    rb = row[col + B_RECURRENT_BIAS]
    c = row[col + B_CARRY]
    carry_in(samples, carry, c, units, hidden)
    p = row[col + B_PARAMS]
    params = weights[p:p + PARAMS_SIZE] if p != NO_PARAMS else weights[:0]  # (5,) or (0,)
    gru_layer(
        x, samples, steps, input_dim,
        shaped(weights, k, (input_dim, width)),
        weights[r:r + units * width],
        weights[ib:ib + width], weights[rb:rb + width],
        row[col + B_ACT], row[col + B_REC_ACT], row[col + B_OPTION] != 0,
        row[col + B_GO_BACKWARDS] != 0, row[col + B_MASKED_OUTPUT], mask, masked,
        hidden, xw, gates, candidate, out, time_ordered_output, params,
    )
    carry_out(samples, hidden, carry, c, units)
