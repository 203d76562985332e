"""Activations, applied in place to a row of floats.

tanh and sigmoid are float32 throughout, from one exponential of a non-positive argument, so every
step vectorises at full width (16 lanes) and nothing overflows:

    e^y (y <= 0):  y = n ln2 + r, |r| <= ln2/2 (Cody-Waite: ln2 in two parts, so n ln2 is exact);
                   e^r by a degree-6 polynomial, 2^n built from its exponent bits
    sigmoid(x):    1 / (1 + e^-|x|), or e^-|x| / (1 + e^-|x|) for x < 0 (no cancellation)
    tanh(x):       (1 - e^-2|x|) / (1 + e^-2|x|) with x's sign, or for |x| < 0.625, where 1 - e
                   would cancel, x + x^3 P(x^2)

Coefficients fitted for this project (iteratively reweighted least squares, relative error: e^r
1.9e-9, P 1.6e-10). Measured against float64 over [-40, 40]: tanh within 9.1e-8 (1.5 ulp),
sigmoid within 8.9e-8; TensorFlow's own float32 tanh is 3.4e-7 off. Recurrences amplify per-step
rounding, so accuracy is not traded for speed here: a float32 rational approximation (3.2e-7)
failed parity with Keras on expansive models. libm's tanh is a scalar call (~15 ns) that blocks
vectorisation.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .._flags import KERNEL_FLAGS, prefer_wide_vectors

LINEAR, TANH, SIGMOID, HARD_SIGMOID, RELU, SOFTMAX = range(6)
# The rest of the ONNX RNN family; those taking alpha/beta run through ``activate_with``.
AFFINE, LEAKY_RELU, THRESHOLDED_RELU, SCALED_TANH, ELU, SOFTSIGN, SOFTPLUS = range(6, 13)
ACTIVATION_CODES = {"linear": LINEAR, "tanh": TANH, "sigmoid": SIGMOID, "hard_sigmoid": HARD_SIGMOID,
                    "relu": RELU, "softmax": SOFTMAX, "affine": AFFINE, "leaky_relu": LEAKY_RELU,
                    "thresholded_relu": THRESHOLDED_RELU, "scaled_tanh": SCALED_TANH, "elu": ELU,
                    "softsign": SOFTSIGN, "softplus": SOFTPLUS}
# Above this, log(1 + e^x) is x in float32 (and e^x would overflow long before).
SOFTPLUS_LINEAR = 20.0

ONE = np.float32(1.0)
HALF = np.float32(0.5)
ZERO = np.float32(0.0)
SIXTH = np.float32(1.0 / 6.0)
TWO = np.float32(2.0)

# e^r on |r| <= ln2/2, and tanh(x) = x + x^3 P(x^2) on |x| < SMALL_TANH.
E0, E1, E2, E3, E4, E5, E6 = (np.float32(1.0), np.float32(1.00000004), np.float32(0.49999992),
                              np.float32(0.1666642), np.float32(0.04166823), np.float32(0.00837482),
                              np.float32(0.00138368))
T1, T2, T3, T4, T5, T6 = (np.float32(-0.33333331), np.float32(0.13333206), np.float32(-0.05394676),
                          np.float32(0.0217007), np.float32(-0.0081774), np.float32(0.00214296))
SMALL_TANH = np.float32(0.625)
LOG2E = np.float32(1.4426950408889634)
LN2_HIGH = np.float32(0.693145751953125)  # ln2's leading 16 bits: n * LN2_HIGH is exact for |n| < 2^8
LN2_LOW = np.float32(1.428606765330187e-06)
# Beyond these, float32 sigmoid and tanh are 0 or 1 (and +-1) within 1e-13 and 3e-8.
SIGMOID_CLAMP = np.float32(30.0)
TANH_CLAMP = np.float32(9.0)


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always", **KERNEL_FLAGS)
def exp_nonpositive(y):
    """e^y for float32 y in [-2 * TANH_CLAMP, 0] or [-SIGMOID_CLAMP, 0]: relative error ~1 ulp."""
    n = np.int32(y * LOG2E - HALF)  # round(y / ln2): the conversion truncates toward zero, and y <= 0
    whole = np.float32(n)
    r = (y - whole * LN2_HIGH) - whole * LN2_LOW
    poly = (((((E6 * r + E5) * r + E4) * r + E3) * r + E2) * r + E1) * r + E0
    return poly * float_from_bits((n + 127) << 23)  # 2^n: n + 127 is its biased exponent


@njit(inline="always", **KERNEL_FLAGS)
def fast_tanh(v):
    a = min(abs(v), TANH_CLAMP)
    e = exp_nonpositive(-TWO * a)
    squared = a * a
    small = a + a * squared * (((((T6 * squared + T5) * squared + T4) * squared + T3) * squared + T2) * squared + T1)
    t = small if a < SMALL_TANH else (ONE - e) / (ONE + e)
    return t if v >= ZERO else -t


@njit(inline="always", **KERNEL_FLAGS)
def fast_sigmoid(v):
    e = exp_nonpositive(-min(abs(v), SIGMOID_CLAMP))
    s = ONE / (ONE + e)
    return s if v >= ZERO else e * s


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
        for j in range(n):
            buf[j] = fast_sigmoid(buf[j])
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
def activate_with(buf, code, alpha, beta, clip):
    """``activate`` for the functions that take parameters, after clipping to [-clip, clip] when
    clip > 0 (ONNX's cell clip). buf: (N,) in place.

    hard_sigmoid:     clip(alpha x + beta, 0, 1)     (Keras 3: alpha 1/6; ONNX default 0.2, beta 0.5)
    affine:           alpha x + beta
    leaky_relu:       x if x >= 0 else alpha x
    thresholded_relu: x if x > alpha else 0
    scaled_tanh:      alpha tanh(beta x)
    elu:              x if x >= 0 else alpha (e^x - 1)
    softsign:         x / (1 + |x|)
    softplus:         log(1 + e^x)
    """
    prefer_wide_vectors()
    n = buf.shape[0]
    if clip > ZERO:
        for j in range(n):
            buf[j] = min(max(buf[j], -clip), clip)
    if code == HARD_SIGMOID:
        for j in range(n):
            buf[j] = min(max(buf[j] * alpha + beta, ZERO), ONE)
    elif code == AFFINE:
        for j in range(n):
            buf[j] = buf[j] * alpha + beta
    elif code == LEAKY_RELU:
        for j in range(n):
            buf[j] = buf[j] if buf[j] >= ZERO else alpha * buf[j]
    elif code == THRESHOLDED_RELU:
        for j in range(n):
            buf[j] = buf[j] if buf[j] > alpha else ZERO
    elif code == SCALED_TANH:
        for j in range(n):
            buf[j] = alpha * fast_tanh(beta * buf[j])
    elif code == ELU:
        # float64 exp: expm1 near 0 keeps the small negative values exact.
        for j in range(n):
            buf[j] = buf[j] if buf[j] >= ZERO else np.float32(alpha * math.expm1(np.float64(buf[j])))
    elif code == SOFTSIGN:
        for j in range(n):
            buf[j] = buf[j] / (ONE + abs(buf[j]))
    elif code == SOFTPLUS:
        for j in range(n):
            v = np.float64(buf[j])
            buf[j] = np.float32(v if v > SOFTPLUS_LINEAR else math.log1p(math.exp(v)))
    else:
        activate(buf, code)
