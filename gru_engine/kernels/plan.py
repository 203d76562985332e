"""The plan: a whole model as one int64 row per layer, run by one compiled call.

``gru_engine.runtime`` packs a validated model into a plan and one float32 weight buffer; the
kernels here walk the rows and call each layer family's kernel. Nothing here knows of files or
Python objects.
"""

import math

from numba import njit, prange

from .._flags import KERNEL_FLAGS, PARALLEL_KERNEL_FLAGS, prefer_wide_vectors
from .activations import ZERO
from .dense import dense_layer
from .gru import BLOCK_WIDTH, gru_block
from .masking import mask_lengths, mask_steps
from .products import BLOCK, padded
from .recurrent import PROJECT_AHEAD, merge_directions

# Layer kinds in column 0 of a plan row.
KIND_MASKING = 0
KIND_GRU = 1
KIND_BIDIRECTIONAL = 2
KIND_DENSE = 3

# Plan row layout. Every row: kind, input_dim, output_dim, then kind-specific columns.
PLAN_WIDTH = 32
COL_KIND, COL_IN, COL_OUT = 0, 1, 2
# masking: weight offset of mask_value
COL_MASK_VALUE = 3
# dense: activation, kernel offset, bias offset
COL_DENSE_ACTIVATION, COL_DENSE_KERNEL, COL_DENSE_BIAS = 3, 4, 5
# gru and bidirectional: merge mode, then one direction block (forward), then a second (backward)
COL_MERGE = 3
COL_FORWARD, COL_BACKWARD = 4, 4 + BLOCK_WIDTH


@njit(**KERNEL_FLAGS)
def run_block(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, out):
    """Run the whole chain on a block of up to BLOCK samples in lockstep.

    plan:    (L, PLAN_WIDTH) int64
    weights: (W,)            float32, every layer's tensors packed
    x:       (S, T, F)       input
    lengths: (S,) or (0,)    int64 valid steps per sample (trailing padding is masked), or none
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
    limited = lengths.shape[0] > 0
    if limited:
        mask_lengths(lengths, samples, rows, mask, False)
    masked = limited
    for layer in range(plan.shape[0]):
        row = plan[layer]
        kind = row[COL_KIND]
        input_dim = row[COL_IN]
        output_dim = row[COL_OUT]
        if kind == KIND_MASKING:
            mask_steps(current, samples, rows, input_dim, weights[row[COL_MASK_VALUE]], mask)
            if limited and masked:
                mask_lengths(lengths, samples, rows, mask, True)
            masked = True
            continue
        if kind == KIND_DENSE:
            k = row[COL_DENSE_KERNEL]
            b = row[COL_DENSE_BIAS]
            dense_layer(current, samples, rows, input_dim,
                        weights[k:k + input_dim * output_dim].reshape((input_dim, output_dim)),
                        weights[b:b + output_dim], row[COL_DENSE_ACTIVATION], following)
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
def run_batch(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_block over the batch, BLOCK samples after BLOCK samples.

    x: (B, T, F), lengths: (B,) or (0,), carry: (B, C), work: (1, K), out: (B, rows * D)
    zero_carry: start from zero state instead of carry's contents.
    Returns ``admit``'s verdict: anything but 0 means nothing ran.
    """
    prefer_wide_vectors()
    bad = admit(plan, x, carry, zero_carry)
    if bad == 0:
        for start in range(0, x.shape[0], BLOCK):
            stop = min(start + BLOCK, x.shape[0])
            run_block(plan, weights, x[start:stop], lengths[start:stop], carry[start:stop], work[0], max_dim,
                      max_gate_width, out[start:stop])
    return bad


@njit(**PARALLEL_KERNEL_FLAGS)
def run_batch_parallel(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_batch with blocks spread over Numba's threads: samples are independent sequences.

    work: (ceil(B / BLOCK), K), one scratch per block.
    """
    prefer_wide_vectors()
    bad = admit(plan, x, carry, zero_carry)
    if bad == 0:
        for block in prange((x.shape[0] + BLOCK - 1) // BLOCK):
            start = block * BLOCK
            stop = min(start + BLOCK, x.shape[0])
            run_block(plan, weights, x[start:stop], lengths[start:stop], carry[start:stop], work[block], max_dim,
                      max_gate_width, out[start:stop])
    return bad


def workspace_size(samples, steps, max_dim, max_gate_width):
    """Floats of scratch run_block needs for a block of ``samples`` samples, in whole cache lines
    so that each block's scratch starts on one."""
    ahead = min(steps, PROJECT_AHEAD)
    return padded(samples * (3 * steps * max_dim + ahead * max_gate_width + 3 * max_gate_width + steps))
