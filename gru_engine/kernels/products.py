"""The products every layer family shares: a row of inputs times a weight matrix, accumulated.

Rows with no dependency on each other (samples in lockstep, time steps of an input projection)
share each weight load four at a time, their sums held in register tiles; a single row sums column
tiles in registers too (AVX-512), or eight matrix rows per pass.
"""

from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._flags import KERNEL_FLAGS, WIDE_VECTOR_REGISTERS, prefer_wide_vectors

# Samples run in lockstep, sharing each weight load (batch mode).
BLOCK = 4
# Gate rows are padded with zero columns to a multiple of this many floats, so the vectorised loops
# over them have no scalar remainder (measured: 50x150 matvec 284 ns, padded to 160: 232 ns).
LANES = 16
# Columns of accumulate_matvec4's register tiles: four samples' tiles fill half the vector
# registers, the rest hold the samples' inputs and the loaded weights. With AVX-512, four samples x
# 64 floats are sixteen of its 32 registers (measured 4 x 50x208: 1731 -> 1053 ns against sums kept
# in memory; 256x768: 27 -> 23 us); with AVX2, 4 x 16 floats are eight of its 16 (measured on a Zen 3:
# 4 x 50x208 in 1.9 us, where 64-float tiles spill to memory and take 4.3 us).
TILE = 64 if WIDE_VECTOR_REGISTERS else 16
MIN_TILE_ROWS = 4
# accumulate_matvec's column tiles read a matrix column stripe by stripe, which beyond L2 is slower
# than passes of eight whole rows (measured 512x1536, 3 MB: 92 us by rows, 105 us by tiles). Up to
# 768 KB the tiles were faster alone (256x768: 5.29 -> 5.00 us) but not measurably in GRU(256), so
# the tiles stop at 256 KB, where they were measured in whole models.
MAX_TILED_FLOATS = 1 << 16


@njit(**KERNEL_FLAGS)
def padded(n):
    """n rounded up to a multiple of LANES: the stored row width of a gate matrix of n columns."""
    return (n + LANES - 1) // LANES * LANES


@njit(**KERNEL_FLAGS)
def accumulate_matvec(v, matrix, acc):
    """acc += v @ matrix: in column tiles held in registers (AVX-512), else eight rows of the
    matrix per pass.

    v:      (R,)
    matrix: (R, N)
    acc:    (N,)
    Eight rows at once keep each acc element in a register across them: an eighth of the loads
    and stores of a plain axpy loop, whose acc traffic dominates at batch 1. LLVM turns their sum
    into one chain of dependent multiply-adds per vector, row after row (it reassociates it), whose
    latency then bounds the pass; column tiles held in registers across every row run three to ten
    such chains side by side (measured 50x208: 228 -> 162 ns; 36x144: 127 -> 82 ns). Both add the
    rows in order, as ``accumulate_matvec4`` does, so a sample's result does not depend on whether
    it ran alone or in a block of four. Passes of eight rows remain for what the tiles do not suit:
    few rows, rows narrower than 48 or unpadded, AVX2's sixteen registers, and large matrices
    (MAX_TILED_FLOATS).
    """
    prefer_wide_vectors()
    rows = v.shape[0]
    width = matrix.shape[1]
    if WIDE_VECTOR_REGISTERS and rows >= MIN_TILE_ROWS and width >= 48 and width % LANES == 0 \
            and rows * width <= MAX_TILED_FLOATS:
        accumulate_tiles(v, matrix, acc)
        return
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


@njit(inline="always", **KERNEL_FLAGS)
def accumulate_tile(v, matrix, acc, first, width, tile):
    """acc[first:first + width] += v @ matrix[:, first:first + width], summed in the stack tile
    ``tile`` (>=width,): inlined with a literal width, it lives in registers across the rows."""
    s = acc[first:first + width]  # (width,)
    for j in range(width):
        tile[j] = s[j]
    for i in range(matrix.shape[0]):
        columns = matrix[i, first:first + width]  # (width,)
        a = v[i]
        for j in range(width):
            tile[j] += a * columns[j]
    for j in range(width):
        s[j] = tile[j]


@njit(**KERNEL_FLAGS)
def accumulate_tiles(v, matrix, acc):
    """acc += v @ matrix for a row of at least 48 columns padded to whole vectors (N a multiple of
    LANES): tiles of 128 columns (eight 512-bit chains, enough to keep both FMA units busy), the
    last one 48 to 160 wide. No tile of 16 or 32: LLVM moved their sums one float at a time
    (measured 50x16: 74 ns in passes of eight rows, 141 ns as a tile; 50x160 as 128 + 32: 380 ns)."""
    prefer_wide_vectors()
    width = matrix.shape[1]
    tile = stack_floats(160)  # (160,)
    first = 0
    while width - first > 160:
        accumulate_tile(v, matrix, acc, first, 128, tile)
        first += 128
    rest = width - first  # 48 .. 160
    # A branch per width: each tile's width must be a literal, for its sums to stay in registers.
    if rest == 160:
        accumulate_tile(v, matrix, acc, first, 160, tile)
    elif rest == 144:
        accumulate_tile(v, matrix, acc, first, 144, tile)
    elif rest == 128:
        accumulate_tile(v, matrix, acc, first, 128, tile)
    elif rest == 112:
        accumulate_tile(v, matrix, acc, first, 112, tile)
    elif rest == 96:
        accumulate_tile(v, matrix, acc, first, 96, tile)
    elif rest == 80:
        accumulate_tile(v, matrix, acc, first, 80, tile)
    elif rest == 64:
        accumulate_tile(v, matrix, acc, first, 64, tile)
    else:
        accumulate_tile(v, matrix, acc, first, 48, tile)


@intrinsic
def stack_floats(typingctx, size):
    """A float32 (size,) array in the calling kernel's stack frame; size must be a literal int.

    LLVM knows such an array aliases nothing else, so the loads and stores of a fixed-size tile
    of it become registers (see ``accumulate_tile4``); a scratch row passed in could alias the
    weights, so LLVM keeps every access to it in memory.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value
    array_type = types.Array(types.float32, 1, "C")

    def codegen(context, builder, signature, args):
        # Imported when a kernel compiles, not when it loads from the cache: the module costs 45 ms.
        from numba.np.arrayobj import make_array, populate_array

        data = cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)
        array = make_array(array_type)(context, builder)
        intp = context.get_value_type(types.intp)
        populate_array(array, data=data, shape=[intp(count)], strides=[intp(4)], itemsize=intp(4), meminfo=None)
        return array._getvalue()

    return array_type(size), codegen


@intrinsic
def shaped(typingctx, array, start, shape):
    """The C-contiguous ``array``'s elements start .. start + prod(shape), as a C-contiguous array of
    ``shape`` (a tuple of ints): ``array.ravel()[start:].reshape(shape)``, built in place. Numba's
    reshape calls into its runtime for each view, and a model call makes a dozen or more (scratch,
    weight matrices). Unchecked, like every index here: callers size ``array`` for the view.
    """
    if not (isinstance(array, types.Array) and array.layout == "C" and isinstance(start, types.Integer)
            and isinstance(shape, types.BaseTuple) and all(isinstance(n, types.Integer) for n in shape)):
        return None
    ndim = len(shape)
    view_type = types.Array(array.dtype, ndim, "C")

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import make_array, populate_array  # see stack_floats

        source = make_array(signature.args[0])(context, builder, args[0])
        dims = [context.cast(builder, n, n_type, types.intp)
                for n, n_type in zip(cgutils.unpack_tuple(builder, args[2], ndim), shape)]
        strides = [source.itemsize] * ndim
        for axis in range(ndim - 2, -1, -1):
            strides[axis] = builder.mul(strides[axis + 1], dims[axis + 1])
        offset = context.cast(builder, args[1], start, types.intp)
        view = make_array(view_type)(context, builder)
        populate_array(view, data=cgutils.gep_inbounds(builder, source.data, offset), shape=dims, strides=strides,
                       itemsize=source.itemsize, meminfo=None)
        return view._getvalue()

    return view_type(array, start, shape), codegen


@njit(inline="always", **KERNEL_FLAGS)
def accumulate_tile4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3, first, width, t0, t1, t2, t3):
    """acc_s[first:first + width] += v_s @ matrix[:, first:first + width] for four samples.

    t_s: (>=width,) stack tiles. Inlined with a literal width, each tile lives in registers
    across the whole sum over the matrix rows: per row, one load of the matrix columns feeds
    four samples' FMAs, and acc is read and written once, not once per row.
    acc is read and written through views indexed from 0, one sample per loop: an offset index
    (Numba's negative-index check) or stores to four arrays that may overlap in one loop kept
    LLVM from making vectors of them, and the tiles went in and out one float at a time
    (measured 4 x 50x208 on AVX2: 1.7 us, 1.1-1.3 us with whole vectors).
    """
    s0 = acc0[first:first + width]  # (width,)
    s1 = acc1[first:first + width]  # (width,)
    s2 = acc2[first:first + width]  # (width,)
    s3 = acc3[first:first + width]  # (width,)
    for j in range(width):
        t0[j] = s0[j]
        t1[j] = s1[j]
        t2[j] = s2[j]
        t3[j] = s3[j]
    for i in range(matrix.shape[0]):
        columns = matrix[i, first:first + width]  # (width,)
        a0, a1, a2, a3 = v0[i], v1[i], v2[i], v3[i]
        for j in range(width):
            m = columns[j]
            t0[j] += a0 * m
            t1[j] += a1 * m
            t2[j] += a2 * m
            t3[j] += a3 * m
    for j in range(width):
        s0[j] = t0[j]
    for j in range(width):
        s1[j] = t1[j]
    for j in range(width):
        s2[j] = t2[j]
    for j in range(width):
        s3[j] = t3[j]


@njit(**KERNEL_FLAGS)
def accumulate_matvec4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3):
    """acc_s += v_s @ matrix for four samples at once, in column tiles held in registers.

    v_s:    (R,)
    matrix: (R, N)
    acc_s:  (N,)
    Each matrix load feeds four samples. Tiles of TILE columns, then of 32 and 16 (those narrower
    than TILE) for the rest of a padded row (literal widths, so each tile is whole registers), then
    column by column for what remains of an unpadded one.
    A matrix of few rows skips the tiles: filling and emptying them would cost more than the sum
    (measured 1x208: 201 ns tiled, 76 ns row by row).
    """
    prefer_wide_vectors()
    rows = matrix.shape[0]
    width = matrix.shape[1]
    if rows < MIN_TILE_ROWS:
        for i in range(rows):
            columns = matrix[i]  # (N,)
            a0, a1, a2, a3 = v0[i], v1[i], v2[i], v3[i]
            for j in range(width):
                acc0[j] += a0 * columns[j]
                acc1[j] += a1 * columns[j]
                acc2[j] += a2 * columns[j]
                acc3[j] += a3 * columns[j]
        return
    t0, t1, t2, t3 = stack_floats(TILE), stack_floats(TILE), stack_floats(TILE), stack_floats(TILE)
    first = 0
    while first + TILE <= width:
        accumulate_tile4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3, first, TILE, t0, t1, t2, t3)
        first += TILE
    # The guards drop the tiles wider than TILE at compile time: never run, they would still index
    # past the stack tiles, which then stay in memory (measured with TILE 16, LSTM airline at batch
    # 1024 on one thread, alternated runs: 20.6-24.6 ms with them, 27.5-29.1 ms without).
    if TILE > 32 and first + 32 <= width:
        accumulate_tile4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3, first, 32, t0, t1, t2, t3)
        first += 32
    if TILE > 16 and first + 16 <= width:
        accumulate_tile4(v0, v1, v2, v3, matrix, acc0, acc1, acc2, acc3, first, 16, t0, t1, t2, t3)
        first += 16
    # The columns of an unpadded matrix past the last 16: a sum per column, in registers.
    for j in range(first, width):
        s0, s1, s2, s3 = acc0[j], acc1[j], acc2[j], acc3[j]
        for i in range(rows):
            m = matrix[i, j]
            s0 += v0[i] * m
            s1 += v1[i] * m
            s2 += v2[i] * m
            s3 += v3[i] * m
        acc0[j], acc1[j], acc2[j], acc3[j] = s0, s1, s2, s3


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


@njit(inline="always", **KERNEL_FLAGS)
def four_rows(q, rows):
    """(sample, row) of the flat rows q .. q + 3 of a (samples, rows) block: four rows that share
    each load of a kernel."""
    s0, t0 = divmod(q, rows)
    s1, t1 = divmod(q + 1, rows)
    s2, t2 = divmod(q + 2, rows)
    s3, t3 = divmod(q + 3, rows)
    return s0, t0, s1, t1, s2, t2, s3, t3


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
        s0, t0, s1, t1, s2, t2, s3, t3 = four_rows(first, rows)
        accumulate_matvec4(x[s0, t0][:input_dim], x[s1, t1][:input_dim], x[s2, t2][:input_dim],
                           x[s3, t3][:input_dim], kernel, out[s0, t0][:n_out], out[s1, t1][:n_out],
                           out[s2, t2][:n_out], out[s3, t3][:n_out])
        first += 4
    while first < total:
        s0, t0 = divmod(first, rows)
        accumulate_matvec(x[s0, t0][:input_dim], kernel, out[s0, t0][:n_out])
        first += 1
