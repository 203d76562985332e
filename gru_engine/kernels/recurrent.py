"""What every recurrent family shares: masked-step outputs and Bidirectional's merge."""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import HALF

# Time steps whose input projection is computed together, just before the recurrence reaches them:
# enough rows to share kernel loads four at a time, few enough to stay in L1 (measured GRU(256),
# T=1000: 3.7% faster than projecting the whole sequence first, whose scratch also grew with T).
PROJECT_AHEAD = 8
# What a recurrent layer emits at a masked step. Keras: zeros with zero_output_for_mask, else its
# previous output in this call (zeros before the first unmasked step, whatever the initial state).
# A stream emits the carry instead, so each step equals predict() on the whole prefix.
MASKED_ZERO, MASKED_PREVIOUS, MASKED_CARRY = 0, 1, 2
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
