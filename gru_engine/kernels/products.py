"""The products every layer family shares: a row of inputs times a weight matrix, accumulated.

Rows with no dependency on each other (samples in lockstep, time steps of an input projection)
share each weight load four at a time; a single row runs eight matrix rows per pass.
"""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors

# Samples run in lockstep, sharing each weight load (batch mode).
BLOCK = 4
# Gate rows are padded with zero columns to a multiple of this many floats, so the vectorised loops
# over them have no scalar remainder (measured: 50x150 matvec 284 ns, padded to 160: 232 ns).
LANES = 16


@njit(**KERNEL_FLAGS)
def padded(n):
    """n rounded up to a multiple of LANES: the stored row width of a gate matrix of n columns."""
    return (n + LANES - 1) // LANES * LANES


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
