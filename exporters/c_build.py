"""Compiling the generated C: the strict flags it is held to, and the builds the tests, the bench
and the size report make. Only a C compiler on PATH is needed (``CC`` / ``CXX`` override it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# What the generated code must compile cleanly under.
STRICT_C_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-Wshadow", "-Wstrict-prototypes",
                  "-Wmissing-prototypes", "-Wdouble-promotion", "-Wfloat-conversion", "-Wvla", "-Wcast-qual")
CXX_FLAGS = ("-x", "c++", "-std=c++17", "-Wall", "-Wextra", "-Werror")
SANITIZE_FLAGS = ("-std=c99", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer")
FAST_FLAGS = ("-std=c99", "-O3", "-march=native")


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
    """Bytes of text and rodata in the compiled object, or None without a compiler and ``size``."""
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
    return {"text": sum(v for k, v in sections.items() if k.startswith(".text")),
            "rodata": sum(v for k, v in sections.items() if k.startswith(".rodata"))}
