"""Compiling the generated C: the strict flags it is held to, the builds the tests, the bench and
the size report make, and ``CModel``, a ctypes binding of one compiled model. Only a C compiler
on PATH is needed (``CC`` / ``CXX`` override it)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from gru_engine.errors import InputError

# What the generated code must compile cleanly under.
STRICT_C_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-Wshadow", "-Wstrict-prototypes",
                  "-Wmissing-prototypes", "-Wdouble-promotion", "-Wfloat-conversion", "-Wvla", "-Wcast-qual")
CXX_FLAGS = ("-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror")
SANITIZE_FLAGS = ("-std=c99", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer")
# The bench's build: fused multiply-adds allowed (ISO C mode otherwise forbids contracting a*b+c).
# On x86-64, 512-bit vectors where the CPU has them: GCC and Clang tune -march=native for 256-bit
# ones on AVX-512 CPUs (measured on Sapphire Rapids: an airline step 1.16 -> 1.05 us, an LSTM
# airline step 1.57 -> 1.33 us). The option is x86's only, and widens nothing the CPU lacks.
FAST_FLAGS = ("-std=c99", "-O3", "-march=native", "-ffp-contract=fast") + \
    (("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())


class CompileError(RuntimeError):
    """The compiler refused generated code (a gru-engine bug: please report it with the message)."""


def compiler(cxx: bool = False) -> str | None:
    """The C (or C++) compiler's path, or None when there is none."""
    variable, default = ("CXX", "c++") if cxx else ("CC", "cc")
    return shutil.which(os.environ.get(variable, default))


def run_compiler(arguments: list[str], cxx: bool = False) -> None:
    tool = compiler(cxx)
    if tool is None:
        raise CompileError(f"no {'C++' if cxx else 'C'} compiler found (set {'CXX' if cxx else 'CC'})")
    done = subprocess.run([tool, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"{Path(tool).name} {' '.join(arguments)} failed:\n{done.stderr[-4000:]}")


def build(sources, output, flags=STRICT_C_FLAGS, extra=(), libraries=("-lm",)) -> Path:
    """Compile and link ``sources`` into ``output`` (add "-shared", "-fPIC" in ``extra`` for a library)."""
    run_compiler([*flags, *extra, *map(str, sources), "-o", str(output), *libraries])
    return Path(output)


def object_sizes(source, flags=("-std=c99", "-O2")) -> dict | None:
    """Bytes of text, rodata, data and bss in the compiled object, or None without a compiler and ``size``."""
    size = shutil.which("size")
    if compiler() is None or size is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        obj = Path(directory) / "model.o"
        try:
            run_compiler([*flags, "-c", str(source), "-o", str(obj)])
        except CompileError:
            return None
        listing = subprocess.run([size, "-A", str(obj)], capture_output=True, text=True).stdout
    sections = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    # Constant tables of pointers sit in .data.rel.ro in position-independent code: read-only data.
    kinds = {".text": "text", ".rodata": "rodata", ".data.rel.ro": "rodata", ".data": "data", ".bss": "bss"}
    sizes = dict.fromkeys(("text", "rodata", "data", "bss"), 0)
    for section, size in sections.items():
        prefix = next((prefix for prefix in kinds if section.startswith(prefix)), None)
        if prefix:
            sizes[kinds[prefix]] += size
    return sizes


FLOATS = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")


class CModel:
    """One exported model inside a loaded library: predict, predict_from, step, self_check.

    The C checks nothing, so every array is checked here before it is handed over.
    """

    def __init__(self, library, name: str, code):
        self.library, self.name, self.code = library, name, code
        self.features = int(_macro(code.header, name, "INPUT_FEATURES"))
        self.state_bytes = code.report["state_bytes"]
        self.can_stream = code.report["can_stream"]
        header = code.header
        self.output_features = int(_macro(header, name, "OUTPUT_FEATURES"))
        self.output_is_sequence = _macro(header, name, "OUTPUT_IS_SEQUENCE") == "1"
        self._work_floats = getattr(library, f"{name}_work_floats")
        self._work_floats.restype, self._work_floats.argtypes = ctypes.c_size_t, [ctypes.c_size_t]
        self.min_steps = int(_macro(header, name, "MIN_STEPS"))
        self.output_steps = getattr(library, f"{name}_output_steps")
        self.output_steps.restype, self.output_steps.argtypes = ctypes.c_size_t, [ctypes.c_size_t]
        self._predict_from = getattr(library, f"{name}_predict_from")
        self._predict_from.argtypes = [ctypes.c_char_p, FLOATS, ctypes.c_size_t, FLOATS, FLOATS]
        self._predict = getattr(library, f"{name}_predict")
        self._predict.argtypes = [FLOATS, ctypes.c_size_t, FLOATS, FLOATS]
        self._self_check = getattr(library, f"{name}_self_check")
        self._self_check.argtypes = [ctypes.POINTER(ctypes.c_float)]
        if self.can_stream:
            self._step = getattr(library, f"{name}_step")
            self._step.argtypes = [ctypes.c_char_p, FLOATS, FLOATS]

    def new_state(self):
        return ctypes.create_string_buffer(self.state_bytes)  # zeros, as NAME_reset leaves it

    def work(self, steps: int) -> np.ndarray:
        return np.full(self._work_floats(steps), np.nan, np.float32)  # NaN: reading unwritten scratch shows

    def output(self, steps: int) -> np.ndarray:
        return np.full(self.output_steps(steps) * self.output_features, np.nan, np.float32)

    def _input(self, x, rank: int) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != rank or x.shape[-1] != self.features or x.size == 0 or not np.isfinite(x).all():
            shape = "(time, features)" if rank == 2 else "(features,)"
            raise InputError(f"x must be a finite {shape} array with {self.features} features, got {x.shape}")
        if rank == 2 and len(x) < self.min_steps:
            raise InputError(f"x has {len(x)} time steps; this model needs at least {self.min_steps}")
        return x

    def _state(self, state):
        if not isinstance(state, ctypes.Array) or ctypes.sizeof(state) != self.state_bytes:
            raise InputError(f"state must be a buffer from new_state() ({self.state_bytes} bytes)")
        return state

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x (T, F) -> (T, D) or (D,)."""
        x = self._input(x, 2)
        y = self.output(len(x))
        self._predict(x.ravel(), len(x), y, self.work(len(x)))
        return y.reshape(-1, self.output_features) if self.output_is_sequence else y

    def predict_from(self, state, x: np.ndarray) -> np.ndarray:
        x = self._input(x, 2)
        y = self.output(len(x))
        self._predict_from(self._state(state), x.ravel(), len(x), y, self.work(len(x)))
        return y.reshape(-1, self.output_features) if self.output_is_sequence else y

    def step(self, state, x_t: np.ndarray) -> np.ndarray:
        y = np.full(self.output_features, np.nan, np.float32)
        self._step(self._state(state), self._input(x_t, 1), y)
        return y

    def state_floats(self, state) -> np.ndarray:
        return np.frombuffer(state.raw, np.float32).copy()

    def self_check(self) -> tuple[int, float]:
        error = ctypes.c_float(-1.0)
        status = self._self_check(ctypes.byref(error))
        return status, error.value


def _macro(header: str, name: str, macro: str) -> str:
    prefix = f"#define {name.upper()}_{macro} "
    line = next(line for line in header.splitlines() if line.startswith(prefix))
    return line[len(prefix):].split()[0]
