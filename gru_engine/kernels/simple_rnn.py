"""The SimpleRNN layer family: one direction of a SimpleRNN over a block of samples in lockstep.

SimpleRNN step (Keras; one bias, on the input side, folded into the input projection ``x_h``):

    h' = activation(x_h + h @ R)      x_h = x @ kernel + bias
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import activate
from .products import padded, shaped
from .recurrent import (B_ACT, B_CARRY, B_GO_BACKWARDS, B_INPUT_BIAS, B_KERNEL, B_MASKED_OUTPUT,
                        B_RECURRENT_KERNEL, B_UNITS, MASKED_CARRY,
                        carry_in, carry_out, gate_sums, skip_masked_step, project_ahead)


@njit(**KERNEL_FLAGS)
def simple_rnn_layer(x, samples, steps, input_dim, kernel, recurrent_kernel, bias, activation, go_backwards,
                     masked_output, mask, masked, h, xw, gates, out, time_ordered_output):
    """Run one SimpleRNN direction over ``steps`` time steps of ``samples`` samples in lockstep.

    x:                (S, >=steps, >=I) layer input in time order
    kernel:           (I, P)         zero padded, P = padded(H)
    recurrent_kernel: (H, P)         zero padded
    bias:             (P,)           zero padded
    masked_output:    MASKED_ZERO, MASKED_PREVIOUS or MASKED_CARRY: the output at a skipped step
    mask:             (S, >=steps)   1.0 keep, 0.0 skip; read only when ``masked``
    h:                (S, >=H)       carry, read as the initial state and updated in place
    xw:               (S, >=min(steps, PROJECT_AHEAD), >=P) scratch for the input projection
    gates:            (S, >=P)       scratch: the pre-activation
    out:              (S, >=steps, >=H) output after each step: in processing order (Keras
                                     go_backwards), or in time order when ``time_ordered_output``
    """
    prefer_wide_vectors()
    units = recurrent_kernel.shape[0]
    # Bit s: sample s has had an unmasked step, so its previous output is its carry (Keras: zero before).
    emitted = (1 << samples) - 1 if masked_output == MASKED_CARRY else 0
    for st in range(steps):
        t = steps - 1 - st if go_backwards else st
        o = t if time_ordered_output else st
        first = project_ahead(x, samples, st, steps, go_backwards, input_dim, kernel, bias, xw)
        gate_sums(samples, xw, t - first, h, recurrent_kernel, gates)
        for s in range(samples):
            hs = h[s]             # (>=H,)
            row = out[s, o]       # (>=H,)
            skipped, emitted = skip_masked_step(masked, mask, s, t, masked_output, emitted, row, hs, units)
            if skipped:
                continue
            g = gates[s][:units]  # (H,)
            activate(g, activation)
            for j in range(units):
                hs[j] = g[j]
                row[j] = g[j]


@njit(**KERNEL_FLAGS)
def simple_rnn_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates,
                     out, time_ordered_output):
    """Run the SimpleRNN described by plan row columns col.. (one direction block, see ``recurrent``).

    carry: (S, C) every direction's carries; hidden: (S, >=H) C-contiguous copy used while running.
    """
    prefer_wide_vectors()
    units = row[col + B_UNITS]
    width = padded(units)
    k = row[col + B_KERNEL]
    r = row[col + B_RECURRENT_KERNEL]
    b = row[col + B_INPUT_BIAS]
    start = row[col + B_CARRY]
    carry_in(samples, carry, start, units, hidden)
    simple_rnn_layer(
        x, samples, steps, input_dim,
        shaped(weights, k, (input_dim, width)),
        shaped(weights, r, (units, width)),
        weights[b:b + width], row[col + B_ACT], row[col + B_GO_BACKWARDS] != 0, row[col + B_MASKED_OUTPUT],
        mask, masked, hidden, xw, gates, out, time_ordered_output,
    )
    carry_out(samples, hidden, carry, start, units)
