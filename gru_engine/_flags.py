"""Numba compilation settings, defined once for every kernel.

- ``cache``: compile once per machine, reuse from ``__pycache__`` in later processes.
- ``nogil``: callers can run kernels from several threads at once.
- ``error_model='numpy'``: no Python-style division checks, which would block vectorisation.
- ``boundscheck=False``: the API layer validates every shape before a kernel runs.
- ``fastmath``: contraction to FMA and reassociation of sums, never 'nnan'/'ninf', which would let
  LLVM delete the finiteness checks the kernels rely on.
- ``prefer_wide_vectors()``: called first in every kernel, see below.
"""

from numba import types
from numba.extending import intrinsic

KERNEL_FLAGS = dict(
    cache=True,
    nogil=True,
    error_model="numpy",
    boundscheck=False,
    fastmath={"contract", "reassoc", "nsz", "arcp"},
    _nrt=False,
)

PARALLEL_KERNEL_FLAGS = dict(KERNEL_FLAGS, parallel=True)

# LLVM tunes for Intel's AVX-512 cores with 256-bit vectors, for the whole process (mixed code can
# lose clock speed on 512-bit ones). The kernels are dense float loops, where 512-bit vectors halve
# the instructions (measured here: airline window 6-13% faster, GRU(128) 17-23%). On a CPU without
# AVX-512, LLVM keeps the widest it has.
PREFERRED_VECTOR_BITS = 512


def _target_features() -> list[str]:
    """The CPU features the kernels compile for: NUMBA_CPU_FEATURES when set, else the host's
    (Numba's JIT codegen's own rule)."""
    from numba.core import codegen, config
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return features.split(",")


# Whether the kernels get AVX-512's 32 vector registers of 16 floats (else AVX2's 16 of 8, or
# fewer): the batch products size their register tiles by it.
WIDE_VECTOR_REGISTERS = "+avx512f" in _target_features()


@intrinsic
def prefer_wide_vectors(typingctx):
    """Ask LLVM for PREFERRED_VECTOR_BITS-wide vectors in the calling kernel, and only there.

    Sets the function attribute "prefer-vector-width" (per function, unlike Numba's process-wide
    NUMBA_CPU_FEATURES, which would retune every other Numba user in the process too). llvmlite's
    attribute set only admits enum attributes by name, so the string attribute goes in through the
    underlying set; if a future llvmlite refuses it, the kernel compiles at the default width.
    """
    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, f'"prefer-vector-width"="{PREFERRED_VECTOR_BITS}"')
        except TypeError:
            pass
        return context.get_dummy_value()

    return types.void(), codegen
