"""What every recurrent family shares: the direction block of a plan row, masked-step outputs,
carries copied in and out, and Bidirectional's merge."""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import HALF, ZERO
from .products import accumulate_rows, project

# Time steps whose input projection is computed together, just before the recurrence reaches them:
# enough rows to share kernel loads four at a time, few enough to stay in L1 (measured GRU(256),
# T=1000: 3.7% faster than projecting the whole sequence first, whose scratch also grew with T).
PROJECT_AHEAD = 8
# What a recurrent layer emits at a masked step. Keras: zeros with zero_output_for_mask, else its
# previous output in this call (zeros before the first unmasked step, whatever the initial state).
# A stream emits the carry instead, so each step equals predict() on the whole prefix.
MASKED_ZERO, MASKED_PREVIOUS, MASKED_CARRY = 0, 1, 2
# The cell a direction block runs (the same codes as the plan's layer kinds for single layers).
CELL_GRU, CELL_LSTM, CELL_SIMPLE_RNN = 1, 4, 5
# One direction's columns in a plan row (see ``plan``), in this order, for every family. Columns a
# family does not use stay 0: LSTM and SimpleRNN have no recurrent bias (Keras keeps one bias, on
# the input side), ``option`` is GRU's reset_after, and ``params`` (ONNX activation parameters and
# cell clip: the weight offset of PARAMS_SIZE floats [recurrent alpha, recurrent beta, alpha, beta,
# clip], or NO_PARAMS) is read by GRU only.
DIRECTION_BLOCK = (
    "cell", "units", "activation", "recurrent_activation", "go_backwards", "return_sequences", "masked_output",
    "kernel", "recurrent_kernel", "input_bias", "recurrent_bias", "carry", "option", "params",
)
BLOCK_WIDTH = len(DIRECTION_BLOCK)
(B_CELL, B_UNITS, B_ACT, B_REC_ACT, B_GO_BACKWARDS, B_RETURN_SEQUENCES, B_MASKED_OUTPUT, B_KERNEL,
 B_RECURRENT_KERNEL, B_INPUT_BIAS, B_RECURRENT_BIAS, B_CARRY, B_OPTION, B_PARAMS) = range(BLOCK_WIDTH)
NO_PARAMS = -1
PARAMS_SIZE = 5
MERGE_CONCAT, MERGE_SUM, MERGE_MUL, MERGE_AVE, MERGE_NONE = range(5)
MERGE_CODES = {"concat": MERGE_CONCAT, "sum": MERGE_SUM, "mul": MERGE_MUL,
               "ave": MERGE_AVE, None: MERGE_NONE}  # None: written as concat, split on return


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
def carry_in(samples, carry, start, units, state):
    """state[s, :units] = carry[s, start:start + units]: a C-contiguous copy the products can read.

    carry: (S, C) every direction's carries; state: (S, >=units)
    """
    prefer_wide_vectors()
    for s in range(samples):
        carried = carry[s, start:start + units]  # (H,)
        row = state[s]                           # (>=H,)
        for j in range(units):
            row[j] = carried[j]


@njit(**KERNEL_FLAGS)
def carry_out(samples, state, carry, start, units):
    """carry[s, start:start + units] = state[s, :units], the reverse of ``carry_in``."""
    prefer_wide_vectors()
    for s in range(samples):
        carried = carry[s, start:start + units]  # (H,)
        row = state[s]                           # (>=H,)
        for j in range(units):
            carried[j] = row[j]


@njit(inline="always", **KERNEL_FLAGS)
def skip_masked_step(masked, mask, s, t, masked_output, emitted, row, state, units):
    """Whether sample s skips step t, and ``emitted`` (bit s: sample s has had an unmasked step).

    Keras skips masked steps: every carry passes through, and the output ``row`` (>=H,) repeats the
    previous output, which is the carry ``state`` (>=H,) once the sample has emitted one, or is zero.
    """
    if masked and mask[s, t] == ZERO:
        repeat = (emitted >> s) & 1
        for j in range(units):
            row[j] = state[j] if repeat else ZERO
        return True, emitted
    if masked_output != MASKED_ZERO:
        emitted |= 1 << s
    return False, emitted


@njit(**KERNEL_FLAGS)
def project_ahead(x, samples, st, steps, go_backwards, input_dim, kernel, bias, xw):
    """At every PROJECT_AHEAD-th step ``st``, the input projection x @ kernel + bias of the next
    PROJECT_AHEAD steps in processing order, at once: it has no time dependency. Returns the time
    index of xw's row 0 at step ``st``.

    x:      (S, >=steps, >=I) layer input in time order
    kernel: (I, P)
    bias:   (P,)
    xw:     (S, >=min(steps, PROJECT_AHEAD), >=P)
    """
    prefer_wide_vectors()
    start = st - st % PROJECT_AHEAD  # processing step of xw's row 0
    count = min(PROJECT_AHEAD, steps - start)
    first = steps - start - count if go_backwards else start
    if st == start:
        project(x[:, first:first + count], samples, count, input_dim, kernel, bias, xw)
    return first


@njit(**KERNEL_FLAGS)
def gate_sums(samples, xw, row, h, recurrent_kernel, gates):
    """gates[s, :P] = xw[s, row, :P] + h[s] @ recurrent_kernel: every gate's pre-activation, for the
    families whose recurrent product covers all gates at once (LSTM, SimpleRNN).

    xw:               (S, >row, >=P) input projections
    h:                (S, >=H) C-contiguous
    recurrent_kernel: (H, P)
    gates:            (S, >=P) C-contiguous
    """
    prefer_wide_vectors()
    width = recurrent_kernel.shape[1]
    for s in range(samples):
        g = gates[s][:width]          # (P,)
        x_t = xw[s, row][:width]      # (P,)
        for j in range(width):
            g[j] = x_t[j]
    accumulate_rows(samples, h, recurrent_kernel, gates, 0)
