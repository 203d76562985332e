"""The LSTM layer family: one direction of an LSTM over a block of samples in lockstep.

LSTM step (Keras; gates i, f, c, o; ``x_*`` the input projection, ``R_*`` the recurrent kernel
columns; Keras has one bias, on the input side, folded into ``x_*``):

    i  = recurrent_activation(x_i + h @ R_i)
    f  = recurrent_activation(x_f + h @ R_f)
    g  = activation(x_c + h @ R_c)
    o  = recurrent_activation(x_o + h @ R_o)
    c' = f * c + i * g
    h' = o * activation(c')

The carry is h and c. The packed columns are i | f | o | c (Keras stores i | f | c | o), so that the
three gates under the recurrent activation are one contiguous row for ``activate``.
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import activate
from .products import padded, shaped
from .recurrent import (B_ACT, B_CARRY, B_GO_BACKWARDS, B_INPUT_BIAS, B_KERNEL, B_MASKED_OUTPUT, B_REC_ACT,
                        B_RECURRENT_KERNEL, B_UNITS, MASKED_CARRY,
                        carry_in, carry_out, gate_sums, skip_masked_step, project_ahead)

# Packed gate order: Keras's i, f, c, o columns moved to i | f | o | c.
PACKED_GATES = (0, 1, 3, 2)


@njit(**KERNEL_FLAGS)
def lstm_layer(x, samples, steps, input_dim, kernel, recurrent_kernel, bias, activation, recurrent_activation,
               go_backwards, masked_output, mask, masked, h, c, xw, gates, out, time_ordered_output):
    """Run one LSTM direction over ``steps`` time steps of ``samples`` samples in lockstep.

    x:                (S, >=steps, >=I) layer input in time order
    kernel:           (I, P)         columns i | f | o | c | zero padding, P = padded(4H)
    recurrent_kernel: (H, P)         columns i | f | o | c | zero padding
    bias:             (P,)           zero padded
    masked_output:    MASKED_ZERO, MASKED_PREVIOUS or MASKED_CARRY: the output at a skipped step
    mask:             (S, >=steps)   1.0 keep, 0.0 skip; read only when ``masked``
    h, c:             (S, >=H)       carries, read as the initial state and updated in place
    xw:               (S, >=min(steps, PROJECT_AHEAD), >=P) scratch for the input projection
    gates:            (S, >=P)       scratch: the gates' pre-activations, then the gates
    out:              (S, >=steps, >=H) output after each step: in processing order (Keras
                                     go_backwards), or in time order when ``time_ordered_output``
    """
    prefer_wide_vectors()
    units = recurrent_kernel.shape[0]
    three = 3 * units
    four = 4 * units
    # Bit s: sample s has had an unmasked step, so its previous output is its carry (Keras: zero before).
    emitted = (1 << samples) - 1 if masked_output == MASKED_CARRY else 0
    for st in range(steps):
        t = steps - 1 - st if go_backwards else st
        o = t if time_ordered_output else st
        first = project_ahead(x, samples, st, steps, go_backwards, input_dim, kernel, bias, xw)
        gate_sums(samples, xw, t - first, h, recurrent_kernel, gates)
        for s in range(samples):
            hs = h[s]             # (>=H,)
            cs = c[s]             # (>=H,)
            row = out[s, o]       # (>=H,)
            skipped, emitted = skip_masked_step(masked, mask, s, t, masked_output, emitted, row, hs, units)
            if skipped:
                continue
            g = gates[s]
            activate(g[:three], recurrent_activation)
            candidate = g[three:four]  # (H,) activation input, then activation(c')
            activate(candidate, activation)
            i = g[:units]              # (H,)
            f = g[units:2 * units]     # (H,)
            for j in range(units):
                cs[j] = f[j] * cs[j] + i[j] * candidate[j]
                candidate[j] = cs[j]
            activate(candidate, activation)
            output_gate = g[2 * units:three]  # (H,)
            for j in range(units):
                hs[j] = output_gate[j] * candidate[j]
                row[j] = hs[j]


@njit(**KERNEL_FLAGS)
def lstm_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, cell, xw, gates,
               out, time_ordered_output):
    """Run the LSTM described by plan row columns col.. (one direction block, see ``recurrent``).

    carry: (S, C) every direction's carries, h then c; hidden, cell: (S, >=H) C-contiguous copies
    used while running.
    """
    prefer_wide_vectors()
    units = row[col + B_UNITS]
    width = padded(4 * units)
    k = row[col + B_KERNEL]
    r = row[col + B_RECURRENT_KERNEL]
    b = row[col + B_INPUT_BIAS]
    start = row[col + B_CARRY]
    carry_in(samples, carry, start, units, hidden)
    carry_in(samples, carry, start + units, units, cell)
    lstm_layer(
        x, samples, steps, input_dim,
        shaped(weights, k, (input_dim, width)),
        shaped(weights, r, (units, width)),
        weights[b:b + width], row[col + B_ACT], row[col + B_REC_ACT],
        row[col + B_GO_BACKWARDS] != 0, row[col + B_MASKED_OUTPUT], mask, masked,
        hidden, cell, xw, gates, out, time_ordered_output,
    )
    carry_out(samples, hidden, carry, start, units)
    carry_out(samples, cell, carry, start + units, units)
