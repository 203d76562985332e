"""The plan: a whole model as one int64 row per layer, run by one compiled call.

``gru_engine.program`` packs a validated model into a plan and one float32 weight buffer; the
kernels here walk the rows and call each layer family's kernel. Nothing here knows of files or
Python objects.
"""

import math

from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._flags import KERNEL_FLAGS, PARALLEL_KERNEL_FLAGS, prefer_wide_vectors
from .activations import ZERO
from .conv import conv1d_layer
from .dense import dense_layer
from .gru import gru_block
from .lstm import lstm_block
from .masking import mask_lengths, mask_steps
from .pooling import affine_layer, global_pool_layer, pool1d_layer
from .products import BLOCK, padded, shaped
from .recurrent import (B_CELL, B_RETURN_SEQUENCES, B_UNITS, BLOCK_WIDTH, CELL_GRU, CELL_LSTM, CELL_SIMPLE_RNN,
                        PROJECT_AHEAD, merge_directions)
from .simple_rnn import simple_rnn_block
from .transforms import CENTER, FIRST_STEP, transform_step

# Layer kinds in column 0 of a plan row; a recurrent layer's kind is the cell its block runs.
KIND_MASKING = 0
KIND_GRU = CELL_GRU
KIND_BIDIRECTIONAL = 2
KIND_DENSE = 3
KIND_LSTM = CELL_LSTM
KIND_SIMPLE_RNN = CELL_SIMPLE_RNN
# Front-end kinds (convolution, pooling, normalization) from 10 on; each may change the row count.
KIND_CONV1D = 10
KIND_MAX_POOLING = 11
KIND_AVERAGE_POOLING = 12
KIND_GLOBAL_MAX_POOLING = 13
KIND_GLOBAL_AVERAGE_POOLING = 14
KIND_BATCH_NORMALIZATION = 15

# Rows of kind >= transforms.FIRST_STEP are a bundle's transform steps: the input steps lead the
# plan, the output steps end it (see ``transforms``).

# Plan row layout. Every row: kind, input_dim, output_dim, then kind-specific columns.
PLAN_WIDTH = 32
COL_KIND, COL_IN, COL_OUT = 0, 1, 2
# masking: weight offset of mask_value
COL_MASK_VALUE = 3
# dense: activation, kernel offset, bias offset
COL_DENSE_ACTIVATION, COL_DENSE_KERNEL, COL_DENSE_BIAS = 3, 4, 5
# recurrent and bidirectional: merge mode, then one direction block (forward), then a second
# (backward); each block names its cell (see ``recurrent.DIRECTION_BLOCK``)
COL_MERGE = 3
COL_FORWARD, COL_BACKWARD = 4, 4 + BLOCK_WIDTH
# conv1d: activation, kernel offset, bias offset, groups, kernel_size, strides, dilation, padding code,
# carry offset of its history (-1: zero padding, not streamed)
(COL_CONV_ACTIVATION, COL_CONV_KERNEL, COL_CONV_BIAS, COL_CONV_GROUPS, COL_CONV_SIZE, COL_CONV_STRIDES,
 COL_CONV_DILATION, COL_CONV_PADDING, COL_CONV_HISTORY) = range(3, 12)
# max and average pooling: pool_size, strides, padding code
COL_POOL_SIZE, COL_POOL_STRIDES, COL_POOL_PADDING = 3, 4, 5
# batch_normalization: weight offsets of its per-channel scale and shift
COL_NORM_SCALE, COL_NORM_SHIFT = 3, 4

# transform steps: transforms.STEP_COLUMNS
COL_STEP = 3
# What ``admit`` returns instead of a count of non-finite samples.
WRONG_WIDTH, TRANSFORM_NOT_FINITE = -1, -2


@njit(**KERNEL_FLAGS)
def kept_means(plan, features):
    """Floats per sample that CENTER steps keep for UNCENTER: one slot of ``features`` per CENTER row."""
    slots = 0
    for layer in range(plan.shape[0]):
        slots += plan[layer, COL_KIND] == CENTER
    return slots * features


@njit(**KERNEL_FLAGS)
def scratch(work, samples, steps, features, max_dim, max_gate_width, means_size):
    """run_block's views of its scratch work (K,); every one C-contiguous, so LLVM knows the strides."""
    size = samples * steps * max_dim
    block = (samples, steps, max_dim)
    current = shaped(work, 0, block)           # (S, T, Dmax)
    following = shaped(work, size, block)      # (S, T, Dmax)
    backward = shaped(work, 2 * size, block)   # (S, T, Dmax)
    offset = 3 * size
    ahead = min(steps, PROJECT_AHEAD)
    xw = shaped(work, offset, (samples, ahead, max_gate_width))  # (S, A, Pmax)
    offset += samples * ahead * max_gate_width
    gates = shaped(work, offset, (samples, max_gate_width))      # (S, Pmax)
    offset += samples * max_gate_width
    spare = shaped(work, offset, (samples, max_gate_width))      # (S, Pmax)
    offset += samples * max_gate_width
    hidden = shaped(work, offset, (samples, max_gate_width))     # (S, Pmax)
    offset += samples * max_gate_width
    mask = shaped(work, offset, (samples, steps))                # (S, T)
    offset += samples * steps
    slots = means_size // features
    means = shaped(work, offset, (samples, slots, features))     # (S, slots, F)
    return current, following, backward, xw, gates, spare, hidden, mask, means


@njit(**KERNEL_FLAGS)
def input_steps(plan, weights, x, current, means):
    """Copy x (S, T, F) into current (S, T, >=F) and run the plan's leading transform steps on it.

    Returns (index of the first layer row, whether every step's input was in its domain).
    """
    prefer_wide_vectors()
    samples, steps, features = x.shape
    for s in range(samples):
        for t in range(steps):
            for f in range(features):
                current[s, t, f] = x[s, t, f]
    ok = True
    first = 0
    while first < plan.shape[0] and plan[first, COL_KIND] >= FIRST_STEP:
        ok &= transform_step(plan[first, COL_KIND], plan[first], COL_STEP, weights, current, samples, steps, means)
        first += 1
    return first, ok


@njit(**KERNEL_FLAGS)
def frontend_layer(row, weights, x, samples, rows, mask, masked, carry, spare, out):
    """Run one front-end layer (kind >= KIND_CONV1D) from x into out; return its output rows.

    x, spare, out: (S, T, Dmax), spare is scratch: no front-end layer returns more rows than it reads.
    """
    kind = row[COL_KIND]
    input_dim = row[COL_IN]
    output_dim = row[COL_OUT]
    if kind == KIND_CONV1D:
        groups, taps = row[COL_CONV_GROUPS], row[COL_CONV_SIZE]
        k = row[COL_CONV_KERNEL]
        b = row[COL_CONV_BIAS]
        return conv1d_layer(x, samples, rows, input_dim, weights[k:k + taps * input_dim * output_dim // groups],
                            taps, groups, weights[b:b + output_dim],
                            row[COL_CONV_STRIDES], row[COL_CONV_DILATION], row[COL_CONV_PADDING],
                            row[COL_CONV_ACTIVATION], carry, row[COL_CONV_HISTORY],
                            shaped(spare, 0, (spare.shape[0], spare.shape[1] * spare.shape[2])), out)
    if kind == KIND_MAX_POOLING or kind == KIND_AVERAGE_POOLING:
        return pool1d_layer(x, samples, rows, input_dim, row[COL_POOL_SIZE], row[COL_POOL_STRIDES],
                            row[COL_POOL_PADDING], kind == KIND_MAX_POOLING, out)
    if kind == KIND_BATCH_NORMALIZATION:
        a = row[COL_NORM_SCALE]
        b = row[COL_NORM_SHIFT]
        affine_layer(x, samples, rows, input_dim, weights[a:a + input_dim], weights[b:b + input_dim], out)
        return rows
    global_pool_layer(x, samples, rows, input_dim, mask, masked, kind == KIND_GLOBAL_MAX_POOLING, out)
    return 1


@njit(**KERNEL_FLAGS)
def run_direction(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates, spare,
                  out, time_ordered_output):
    """Run the direction block at columns col.. with its cell's kernel.

    hidden, spare: (S, >=Pmax) scratch: the carry h while running, and GRU's r * h or LSTM's c.
    """
    cell = row[col + B_CELL]
    if cell == CELL_LSTM:
        lstm_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, spare, xw, gates,
                   out, time_ordered_output)
    elif cell == CELL_SIMPLE_RNN:
        simple_rnn_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates,
                         out, time_ordered_output)
    else:
        gru_block(row, col, weights, input_dim, x, samples, steps, mask, masked, carry, hidden, xw, gates, spare,
                  out, time_ordered_output)


@njit(**KERNEL_FLAGS)
def run_block(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, out):
    """Run the whole chain on a block of up to BLOCK samples in lockstep.

    plan:    (L, PLAN_WIDTH) int64
    weights: (W,)            float32, every layer's tensors packed
    x:       (S, T, F)       input
    lengths: (S,) or (0,)    int64 valid steps per sample (trailing padding is masked), or none
    carry:   (S, C)          every recurrent direction's carries, read as initial state, left as final state
    work:    (K,)            scratch, see ``workspace_size``
    out:     (S, rows * D)   the last layer's output, rows = T for sequences, else 1
    """
    prefer_wide_vectors()
    samples = x.shape[0]
    steps = x.shape[1]
    current, following, backward, xw, gates, spare, hidden, mask, means = scratch(
        work, samples, steps, x.shape[2], max_dim, max_gate_width, kept_means(plan, x.shape[2]))
    first, _ = input_steps(plan, weights, x, current, means)  # ``admit`` has checked their domain
    rows = steps
    masked = lengths.shape[0] > 0
    if masked:
        mask_lengths(lengths, samples, rows, mask, False)
    for layer in range(first, plan.shape[0]):
        row = plan[layer]
        kind = row[COL_KIND]
        input_dim = row[COL_IN]
        output_dim = row[COL_OUT]
        if kind >= FIRST_STEP:  # an output step: in place
            transform_step(kind, row, COL_STEP, weights, current, samples, rows, means)
            continue
        if kind == KIND_MASKING:
            mask_steps(current, samples, rows, input_dim, weights[row[COL_MASK_VALUE]], mask)
            if lengths.shape[0]:
                mask_lengths(lengths, samples, rows, mask, True)
            masked = True
            continue
        if kind >= KIND_CONV1D:
            rows = frontend_layer(row, weights, current, samples, rows, mask, masked, carry, backward, following)
            # Keras's Conv1D and pooling layers drop the mask; BatchNormalization passes it on. Lengths
            # hold on (the runtime admits them only through front-ends that keep each step's row).
            if lengths.shape[0] and kind != KIND_BATCH_NORMALIZATION:
                mask_lengths(lengths, samples, rows, mask, False)
            else:
                masked = masked and kind == KIND_BATCH_NORMALIZATION
        elif kind == KIND_DENSE:
            k = row[COL_DENSE_KERNEL]
            b = row[COL_DENSE_BIAS]
            dense_layer(current, samples, rows, input_dim,
                        shaped(weights, k, (input_dim, output_dim)),
                        weights[b:b + output_dim], row[COL_DENSE_ACTIVATION], following)
        else:
            bidirectional = kind == KIND_BIDIRECTIONAL
            # One call site with run-time arguments: a literal column or flag per direction would make
            # Numba compile every recurrent family twice.
            for direction in range(1 + bidirectional):
                backward_direction = direction == 1
                run_direction(row, COL_FORWARD + direction * BLOCK_WIDTH, weights, input_dim, current, samples,
                              rows, mask, masked, carry, hidden, xw, gates, spare,
                              backward if backward_direction else following, backward_direction)
            units = row[COL_FORWARD + B_UNITS]
            if not row[COL_FORWARD + B_RETURN_SEQUENCES]:
                # Keep the last output: forward at t=T-1 (a Bidirectional's backward one is at t=0).
                for s in range(samples):
                    for j in range(units):
                        following[s, 0, j] = following[s, rows - 1, j]
                rows = 1
                masked = False
            if bidirectional:
                merge_directions(row[COL_MERGE], samples, rows, units, row[COL_BACKWARD + B_UNITS], following, backward)
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
def admit(plan, weights, x, carry, work, max_dim, max_gate_width, zero_carry):
    """What run_batch and run_batch_parallel check before running anything, so no carry changes
    half-way: WRONG_WIDTH if x's width is not the plan's input width, else how many samples of x are
    not finite, else TRANSFORM_NOT_FINITE if the plan's input steps turn any sample non-finite (the
    log of a value <= 0, an overflow; run on work[0], block by block). When all is well and
    ``zero_carry`` is set, carry (B, C) is zeroed (it is then scratch)."""
    prefer_wide_vectors()
    if x.shape[2] != plan[0, COL_IN]:
        return WRONG_WIDTH
    bad = count_nonfinite(x)
    if bad == 0 and plan[0, COL_KIND] >= FIRST_STEP:
        for start in range(0, x.shape[0], BLOCK):
            block = x[start:min(start + BLOCK, x.shape[0])]
            current, _, _, _, _, _, _, _, means = scratch(work[0], block.shape[0], block.shape[1], block.shape[2],
                                                          max_dim, max_gate_width, kept_means(plan, block.shape[2]))
            _, ok = input_steps(plan, weights, block, current, means)
            for s in range(block.shape[0]):
                for t in range(block.shape[1]):
                    for f in range(block.shape[2]):
                        ok &= math.isfinite(current[s, t, f])
            if not ok:
                return TRANSFORM_NOT_FINITE
    if bad == 0 and zero_carry:
        carry[:] = ZERO
    return bad


@njit(inline="always", **KERNEL_FLAGS)
def sample_rows(out):
    """A C-contiguous out (B, ...) with B >= 1 as (B, everything else): one row per sample."""
    return shaped(out, 0, (out.shape[0], out.size // out.shape[0]))


@njit(**KERNEL_FLAGS)
def run_batch(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_block over the batch, BLOCK samples after BLOCK samples.

    x: (B, T, F), lengths: (B,) or (0,), carry: (B, C), work: (1, K)
    out: (B, rows * D), or (B, rows, D): what the caller returns, so no call reshapes it
    zero_carry: start from zero state instead of carry's contents.
    Returns ``admit``'s verdict: anything but 0 means nothing ran.
    """
    prefer_wide_vectors()
    bad = admit(plan, weights, x, carry, work, max_dim, max_gate_width, zero_carry)
    if bad == 0:
        flat_out = sample_rows(out)  # (B, rows * D)
        for start in range(0, x.shape[0], BLOCK):
            stop = min(start + BLOCK, x.shape[0])
            run_block(plan, weights, x[start:stop], lengths[start:stop], carry[start:stop], work[0], max_dim,
                      max_gate_width, flat_out[start:stop])
    return bad


@intrinsic
def zero_counter(typingctx):
    """An int64 (1,) array holding 0, in the calling kernel's stack frame: the parallel loop's
    workers share it, and no allocation is needed."""
    array_type = types.Array(types.int64, 1, "C")

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import make_array, populate_array  # see products.stack_floats

        int64 = context.get_value_type(types.int64)
        array = make_array(array_type)(context, builder)
        populate_array(array, data=cgutils.alloca_once_value(builder, int64(0)), shape=[int64(1)],
                       strides=[int64(8)], itemsize=int64(8), meminfo=None)
        return array._getvalue()

    return array_type(), codegen


@intrinsic
def fetch_add(typingctx, counter, amount):
    """counter[0] += amount as one atomic operation; returns counter[0] from before it. Only the
    count is shared, so no ordering of other memory is needed ("monotonic")."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and isinstance(amount, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import make_array

        data = make_array(signature.args[0])(context, builder, args[0]).data
        value = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", data, value, "monotonic")

    return types.int64(counter, amount), codegen


@njit(**PARALLEL_KERNEL_FLAGS)
def run_batch_parallel(plan, weights, x, lengths, carry, work, max_dim, max_gate_width, zero_carry, out):
    """run_batch with blocks spread over Numba's threads: samples are independent sequences.

    work: (W, K), one scratch per worker: W workers each claim the next unclaimed block until none
    is left. Claimed, not split in equal shares: a core slowed by anything else on the machine
    (another process, a thread pool still spinning, the hypervisor) then runs fewer blocks instead
    of holding up the call (measured, LSTM airline at batch 1024 on 2 vCPUs beside onnxruntime:
    0.93-1.07x its throughput with equal shares, 1.24-1.32x claimed). A scratch per worker rather
    than per block stays in its core's cache (a scratch per block was 17 MB, touched once per call).
    """
    prefer_wide_vectors()
    bad = admit(plan, weights, x, carry, work, max_dim, max_gate_width, zero_carry)
    if bad == 0:
        flat_out = sample_rows(out)  # (B, rows * D)
        blocks = (x.shape[0] + BLOCK - 1) // BLOCK
        claimed = zero_counter()  # (1,): blocks claimed so far, shared by the workers
        for worker in prange(work.shape[0]):
            while True:
                block = fetch_add(claimed, 1)
                if block >= blocks:
                    break
                start = block * BLOCK
                stop = min(start + BLOCK, x.shape[0])
                run_block(plan, weights, x[start:stop], lengths[start:stop], carry[start:stop], work[worker],
                          max_dim, max_gate_width, flat_out[start:stop])
    return bad


def workspace_size(samples, steps, max_dim, max_gate_width, means_size):
    """Floats of scratch run_block needs for a block of ``samples`` samples (``means_size``: see
    ``kept_means``), in whole cache lines so that each block's scratch starts on one."""
    ahead = min(steps, PROJECT_AHEAD)
    return padded(samples * (3 * steps * max_dim + ahead * max_gate_width + 3 * max_gate_width + steps + means_size))
