"""Numba compilation flags, defined once for every kernel.

- ``cache``: compile once per machine, reuse from ``__pycache__`` in later processes.
- ``nogil``: callers can run kernels from several threads at once.
- ``error_model='numpy'``: no Python-style division checks, which would block vectorisation.
- ``boundscheck=False``: the API layer validates every shape before a kernel runs.
- ``fastmath``: contraction to FMA and reassociation of sums, never 'nnan'/'ninf', which would let
  LLVM delete the finiteness checks the kernels rely on.
"""

KERNEL_FLAGS = dict(
    cache=True,
    nogil=True,
    error_model="numpy",
    boundscheck=False,
    fastmath={"contract", "reassoc", "nsz", "arcp"},
    _nrt=False,
)

PARALLEL_KERNEL_FLAGS = dict(KERNEL_FLAGS, parallel=True)
