"""Build generated C for many models at once and drive it through ctypes, for the C export tests.

Each model gets its own prefix, so all of them link into a few shared libraries: one per core,
compiled in parallel under the strict flags.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
from pathlib import Path

from gru_engine.exporters import c_build
from gru_engine.exporters.c_build import CModel
from gru_engine.exporters.c_writer import build_c

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
            models[name] = CModel(library, name, written[name][0])
    return models
