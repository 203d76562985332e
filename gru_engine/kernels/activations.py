"""Activations, applied in place to a row of floats.

tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (beyond, float32 tanh is +-1 within 3e-8). Coefficients
fitted for this project (iteratively reweighted least squares): max error 2e-8 in float64.
The polynomials are evaluated in float64, because recurrences amplify per-step rounding
(evaluated in float32 the error was 3.2e-7, and parity with Keras failed on expansive models).
The divide is float32: 1.4e-7 in all (TensorFlow's own float32 tanh: 3.4e-7, measured here),
and it was the bottleneck: a float64 divide has a third of the throughput (airline window 3-10%
faster). libm's tanh is a scalar call (~15 ns) that blocks vectorisation.
"""

import math

import numpy as np
from numba import njit

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

TANH_CLAMP = 9.0
P0, P1, P2, P3, P4, P5 = (
    9.99999908e-01, 1.36261799e-01, 3.80222599e-03, 2.67446258e-05, 2.78178600e-08, -1.03821162e-11)
Q0, Q1, Q2, Q3, Q4 = (1.0, 4.69594857e-01, 2.70007688e-02, 3.82464926e-04, 1.20278291e-06)
ONE = np.float32(1.0)
HALF = np.float32(0.5)
ZERO = np.float32(0.0)
SIXTH = np.float32(1.0 / 6.0)


@njit(inline="always", **KERNEL_FLAGS)
def fast_tanh(v):
    x = min(max(np.float64(v), -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = ((((P5 * x2 + P4) * x2 + P3) * x2 + P2) * x2 + P1) * x2 + P0
    q = (((Q4 * x2 + Q3) * x2 + Q2) * x2 + Q1) * x2 + Q0
    return min(max(np.float32(x * p) / np.float32(q), -ONE), ONE)


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
        # sigmoid(x) = (tanh(x/2) + 1) / 2, exactly; shares the vectorised tanh.
        for j in range(n):
            buf[j] = HALF * fast_tanh(HALF * buf[j]) + HALF
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
