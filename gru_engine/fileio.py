"""Atomic file writes and strict readers for the CLI's input files."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError

MAX_INPUT_BYTES = 1 << 30


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)``, then rename the temp file onto ``path``.

    The temp file sits in the target directory, so the rename is atomic: ``path`` holds either the
    previous file or the complete new one, and a failure leaves no partial file behind.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    def write(temp):
        with open(temp, "wb") as handle:
            handle.write(data)
    return atomic_write(path, write)


def read_array(path) -> np.ndarray:
    """Read a numeric array from .npy (never unpickled) or .csv (rows of numbers, optional header)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise InputError(f"{path}: larger than {MAX_INPUT_BYTES >> 20} MiB; split it")
    if path.suffix == ".npy":
        try:  # mmap checks the header's shape against the file size, so a lying header allocates nothing
            array = np.array(np.load(path, allow_pickle=False, mmap_mode="r"))
        except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError, OSError
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(f"{path}: not a plain numeric .npy file ({reason}); object arrays are refused") from None
        if array.dtype.kind not in "fiub":
            raise InputError(f"{path}: holds {array.dtype}; a numeric array is needed")
        return array
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            return parse_csv_rows(list(csv.reader(handle)), str(path))
    raise InputError(f"{path}: unknown input type; use .npy (batch, time, features) or .csv (time, features)")


def parse_csv_row(row: list[str], where: str) -> list[float]:
    try:
        return [float(cell) for cell in row]
    except ValueError:
        raise InputError(f"{where}: {row!r} is not a row of numbers") from None


def is_header(row: list[str]) -> bool:
    """A first CSV row that is not all numbers is a header (column names)."""
    try:
        [float(cell) for cell in row]
    except ValueError:
        return True
    return False


def parse_csv_rows(rows: list[list[str]], where: str) -> np.ndarray:
    """CSV rows -> (time, features) float64; a first row that is not numeric is a header."""
    rows = [row for row in rows if row]
    if rows and is_header(rows[0]):
        rows = rows[1:]
    if not rows:
        raise InputError(f"{where}: no data rows")
    values = [parse_csv_row(row, f"{where} line {index + 1}") for index, row in enumerate(rows)]
    if len({len(row) for row in values}) != 1:
        raise InputError(f"{where}: rows have different numbers of columns")
    return np.asarray(values, dtype=np.float64)


OUTPUT_SUFFIXES = (".npy", ".csv")


def check_output_path(path) -> Path:
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: unknown output type; use one of {', '.join(OUTPUT_SUFFIXES)}")
    return path


def save_array(path, array: np.ndarray) -> Path:
    """Write .npy or .csv atomically."""
    path = check_output_path(path)
    if path.suffix == ".csv":
        flat = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array[:, None]

        def write(temp):
            np.savetxt(temp, flat, delimiter=",", fmt="%.9g")
        return atomic_write(path, write)

    def write_npy(temp):
        with open(temp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    return atomic_write(path, write_npy)
