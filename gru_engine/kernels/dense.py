"""The Dense layer, applied to every time step: y = activation(x @ kernel + bias)."""

from numba import njit

from .._flags import KERNEL_FLAGS, prefer_wide_vectors
from .activations import activate
from .products import project


@njit(**KERNEL_FLAGS)
def dense_layer(x, samples, rows, input_dim, kernel, bias, activation, out):
    """x: (S, >=rows, >=I); kernel: (I, D); bias: (D,); out: (S, >=rows, >=D) C-contiguous."""
    prefer_wide_vectors()
    output_dim = kernel.shape[1]
    project(x, samples, rows, input_dim, kernel, bias, out)
    for s in range(samples):
        for t in range(rows):
            activate(out[s, t][:output_dim], activation)
