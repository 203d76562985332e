"""Build generated C for many models at once and drive it through ctypes, for the C export tests.

Each model gets its own prefix, so all of them link into a few shared libraries: one per core,
compiled in parallel under the strict flags.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
from pathlib import Path

import numpy as np

from gru_engine.exporters import c_build
from gru_engine.exporters.c_writer import build_c

FLOATS = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")


class CModel:
    """One exported model inside a loaded library: predict, predict_from, step, self_check."""

    def __init__(self, library, name: str, code, features: int):
        self.name, self.code, self.features = name, code, features
        self.state_bytes = code.report["state_bytes"]
        self.can_stream = code.report["can_stream"]
        header = code.header
        self.output_features = int(_macro(header, name, "OUTPUT_FEATURES"))
        self.output_is_sequence = _macro(header, name, "OUTPUT_IS_SEQUENCE") == "1"
        self._work_floats = getattr(library, f"{name}_work_floats")
        self._work_floats.restype, self._work_floats.argtypes = ctypes.c_size_t, [ctypes.c_size_t]
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
        rows = steps if self.output_is_sequence else 1
        return np.full(rows * self.output_features, np.nan, np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """x (T, F) -> (T, D) or (D,)."""
        x = np.ascontiguousarray(x, np.float32)
        y = self.output(len(x))
        self._predict(x.ravel(), len(x), y, self.work(len(x)))
        return y.reshape(len(x), -1) if self.output_is_sequence else y

    def predict_from(self, state, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        y = self.output(len(x))
        self._predict_from(state, x.ravel(), len(x), y, self.work(len(x)))
        return y.reshape(len(x), -1) if self.output_is_sequence else y

    def step(self, state, x_t: np.ndarray) -> np.ndarray:
        y = np.full(self.output_features, np.nan, np.float32)
        self._step(state, np.ascontiguousarray(x_t, np.float32), y)
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


def write_sources(specs: dict, directory: Path, weights: str = "float32", tolerances=None) -> dict:
    """name -> (code, .c path) for every spec, written under ``directory``."""
    written = {}
    for name, spec in specs.items():
        tolerance = (tolerances or {}).get(name)
        code = build_c(spec, name, weights, f"test case {name}", *([tolerance] if tolerance else []))
        (directory / f"{name}.h").write_text(code.header)
        source = directory / f"{name}.c"
        source.write_text(code.source)
        written[name] = (code, source)
    return written


def build_libraries(written: dict, directory: Path, tag: str) -> dict:
    """Compile every source under the strict flags into one library per core; name -> CModel."""
    names = sorted(written)
    groups = max(1, min(os.cpu_count() or 1, len(names)))
    chunks = [names[i::groups] for i in range(groups)]

    def compile_chunk(index: int) -> Path:
        output = directory / f"lib{tag}{index}.so"
        return c_build.build([written[name][1] for name in chunks[index]], output,
                             extra=("-shared", "-fPIC", f"-I{directory}"))

    with concurrent.futures.ThreadPoolExecutor(groups) as pool:
        libraries = list(pool.map(compile_chunk, range(groups)))
    models = {}
    for chunk, path in zip(chunks, libraries):
        library = ctypes.CDLL(str(path))
        for name in chunk:
            code = written[name][0]
            models[name] = CModel(library, name, code, int(_macro(code.header, name, "INPUT_FEATURES")))
    return models
