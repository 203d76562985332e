"""Data sets for ``gru-engine score``: sequences (batch, time, features) read, and outputs written, a
range of rows at a time, so no file is ever read whole.

Inputs (``open_source``):

- ``.npy``: memory-mapped; each read copies only its rows.
- Zarr (a directory ending in ``.zarr``, or holding ``zarr.json`` / ``.zarray``): an array, best
  chunked along the batch axis only.
- Parquet (a ``.parquet`` file, or a directory of them, read in name order): one column of float
  lists holding time·features values per row (fixed-size lists, or plain lists of that length),
  the per-row shape ``[time, features]`` as JSON under the schema metadata key ``gru_engine.shape``
  or given as ``shape``. Other columns can be copied through to the output (an id, say).

Outputs (``Sink``), chosen by the output's suffix: ``.npy``, ``.zarr`` or ``.parquet``; a Parquet
output is a directory of part files, one per chunk, with the column ``output`` and its per-row shape
under ``gru_engine.shape``. Sinks write into a staging directory; ``finish`` moves the result under
its final name only when every chunk is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .dask import require
from .errors import InputError
from .fileio import atomic_write
from .runtime import ACCEPTED_KINDS

SHAPE_KEY = b"gru_engine.shape"
OUTPUT_COLUMN = "output"
KINDS = ("npy", "zarr", "parquet")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def input_kind(path: Path) -> str:
    if path.suffix == ".npy":
        return "npy"
    if path.suffix == ".zarr" or (path / "zarr.json").is_file() or (path / ".zarray").is_file():
        return "zarr"
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return "parquet"
    raise InputError(f"{path}: unknown input type; use a .npy file, a Zarr array (.zarr) or Parquet "
                     "(a .parquet file or a directory of them)")


def output_kind(path: Path) -> str:
    kind = path.suffix.lstrip(".")
    if kind not in KINDS:
        raise InputError(f"{path}: unknown output type; end the name in .npy, .zarr or .parquet")
    return kind


def identity(path: Path) -> dict:
    """What makes this input the same input as before: its files' names, sizes and modification times."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return {"path": str(path), "files": len(files), "sha256": digest.hexdigest()}


def check_shape(shape, dtype, where: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise InputError(f"{where}: shape {tuple(shape)}; sequences must be (batch, time, features)")
    if np.dtype(dtype).kind not in ACCEPTED_KINDS:
        raise InputError(f"{where}: holds {dtype}; a numeric array is needed")
    if min(shape) < 1:
        raise InputError(f"{where}: shape {tuple(shape)}; batch, time and features must all be at least 1")
    return tuple(int(n) for n in shape)


@dataclasses.dataclass
class NpySource:
    """A .npy file, memory-mapped on every read."""

    path: str
    shape: tuple[int, int, int]
    kind = "npy"
    chunk_rows = None  # any row range is as cheap as any other

    @classmethod
    def open(cls, path: Path) -> "NpySource":
        try:  # mmap checks the header against the file size and never unpickles
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, OSError...
            raise InputError(f"{path}: not a readable numeric .npy file ({first_line(exc)})") from None
        return cls(str(path), check_shape(array.shape, array.dtype, str(path)))

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = np.load(self.path, mmap_mode="r", allow_pickle=False)[start:stop]
        return np.array(rows, np.float32, order="C")  # (n, T, F), copied off the mapping


@dataclasses.dataclass
class ZarrSource:
    path: str
    shape: tuple[int, int, int]
    chunk_rows: int
    kind = "zarr"

    @classmethod
    def open(cls, path: Path) -> "ZarrSource":
        zarr = require("zarr")
        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as exc:
            raise InputError(f"{path}: not a readable Zarr array ({first_line(exc)})") from None
        return cls(str(path), check_shape(array.shape, array.dtype, str(path)), int(array.chunks[0]))

    def read(self, start: int, stop: int) -> np.ndarray:
        import zarr
        return np.ascontiguousarray(zarr.open_array(self.path, mode="r")[start:stop], np.float32)


@dataclasses.dataclass
class ParquetSource:
    """Parquet files read by row group; ``groups`` lists (file, row group, first row, rows)."""

    path: str
    shape: tuple[int, int, int]
    column: str
    groups: list[tuple[str, int, int, int]]
    other_columns: list[str]
    chunk_rows = None
    kind = "parquet"

    @classmethod
    def open(cls, path: Path, shape=None, column=None) -> "ParquetSource":
        pa, pq = require("pyarrow"), require("pyarrow.parquet")
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise InputError(f"{path}: no .parquet files in this directory")
        groups, schema, rows = [], None, 0
        for file in files:
            try:
                metadata = pq.ParquetFile(file).metadata
            except Exception as exc:
                raise InputError(f"{file}: not a readable Parquet file ({first_line(exc)})") from None
            file_schema = metadata.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema, check_metadata=False):
                raise InputError(f"{file}: its columns differ from {files[0].name}'s; every part must share one schema")
            for group in range(metadata.num_row_groups):
                count = metadata.row_group(group).num_rows
                groups.append((str(file), group, rows, count))
                rows += count
        column = column or cls._find_column(schema, path)
        if column not in schema.names:
            raise InputError(f"{path}: no column '{column}'; columns are {schema.names}")
        kind = schema.field(column).type
        if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)) \
                or not pa.types.is_floating(kind.value_type):
            raise InputError(f"{path}: column '{column}' is {kind}; it must hold lists of float32 values")
        steps, features = cls._row_shape(schema, shape, path)
        if pa.types.is_fixed_size_list(kind) and kind.list_size != steps * features:
            raise InputError(f"{path}: column '{column}' holds lists of {kind.list_size} values, but the shape "
                             f"{steps},{features} needs time x features = {steps * features}; give the right "
                             "--shape T,F")
        source = cls(str(path), check_shape((rows, steps, features), np.float32, str(path)), column, groups,
                     [name for name in schema.names if name != column])
        return source

    @staticmethod
    def _find_column(schema, path) -> str:
        import pyarrow as pa
        lists = [field.name for field in schema
                 if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type)
                 or pa.types.is_large_list(field.type)]
        if len(lists) != 1:
            raise InputError(f"{path}: {len(lists)} list columns ({lists}); say which holds the sequences: --column NAME")
        return lists[0]

    @staticmethod
    def _row_shape(schema, shape, path) -> tuple[int, int]:
        stored = (schema.metadata or {}).get(SHAPE_KEY)
        if shape is None and stored is None:
            raise InputError(f"{path}: no per-row shape in the file's metadata ({SHAPE_KEY.decode()}); "
                             "give it as --shape T,F (time steps, features)")
        if shape is None:
            try:
                shape = json.loads(stored)
            except ValueError:
                raise InputError(f"{path}: metadata {SHAPE_KEY.decode()} is not JSON [time, features]") from None
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(
                type(n) is int and n >= 1 for n in shape):
            raise InputError(f"{path}: per-row shape {shape!r}; it must be two positive ints: time, features")
        return int(shape[0]), int(shape[1])

    def read_table(self, start: int, stop: int, columns: list[str]):
        """Rows [start, stop) of ``columns`` as one pyarrow Table."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        pieces = []
        for file, group, first, count in self.groups:
            if first < stop and first + count > start:
                table = pq.ParquetFile(file).read_row_group(group, columns=columns)
                pieces.append(table.slice(max(0, start - first), min(stop, first + count) - max(start, first)))
        return pa.concat_tables(pieces) if pieces else None

    def read(self, start: int, stop: int) -> np.ndarray:
        import pyarrow as pa
        values = self.read_table(start, stop, [self.column]).column(self.column).combine_chunks()
        _, steps, features = self.shape
        if values.null_count:
            raise InputError(f"{self.path}: rows {start}..{stop - 1} include a missing (null) sequence")
        if not pa.types.is_fixed_size_list(values.type):
            lengths = np.diff(np.asarray(values.offsets))
            wrong = np.flatnonzero(lengths != steps * features)
            if wrong.size:
                raise InputError(f"{self.path}: row {start + int(wrong[0])} of column '{self.column}' holds "
                                 f"{int(lengths[wrong[0]])} values; every row needs time x features = "
                                 f"{steps * features}")
        flat = values.flatten().to_numpy(zero_copy_only=False)  # (n * T * F,); nulls inside become NaN
        return np.ascontiguousarray(flat.reshape(stop - start, steps, features), np.float32)


def open_source(path, shape=None, column=None):
    """Open and check an input data set (nothing but headers and metadata is read)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    kind = input_kind(path)
    if kind == "npy":
        source = NpySource.open(path)
    elif kind == "zarr":
        source = ZarrSource.open(path)
    else:
        source = ParquetSource.open(path, shape, column)
    if (shape is not None or column is not None) and kind != "parquet":
        raise InputError("--shape and --column describe Parquet input; a .npy or Zarr array has its own shape")
    return source


# ----- outputs ------------------------------------------------------------------------------------------


def _part_name(index: int, suffix: str) -> str:
    return f"part-{index:06d}{suffix}"


@dataclasses.dataclass
class Sink:
    """Writes chunks of outputs into ``data`` (a staging directory) and then publishes them as ``path``."""

    kind: str
    data: str                       # the output under construction
    rows: int
    row_shape: tuple[int, ...]      # (D,) or (time, D)
    chunk_rows: int
    keep: list[str] = dataclasses.field(default_factory=list)  # Parquet columns copied from the input

    def prepare(self) -> None:
        """Create the staging output (on the client, before any chunk), keeping what a resumed job wrote."""
        data = Path(self.data)
        if self.kind == "zarr":
            zarr = require("zarr")
            if not data.exists():  # chunks of one job chunk each: a chunk write is one file, renamed into place
                zarr.create_array(str(data), shape=(self.rows, *self.row_shape), dtype="float32",
                                  chunks=(self.chunk_rows, *self.row_shape), fill_value=0.0,
                                  attributes={"gru_engine": {"written_by": "gru-engine score"}})
        else:
            data.mkdir(parents=True, exist_ok=True)

    def write(self, index: int, start: int, y: np.ndarray, source=None) -> None:
        """Write chunk ``index`` (rows ``start`` ..): atomically, so it is either absent or complete."""
        data = Path(self.data)
        if self.kind == "zarr":
            import zarr
            zarr.open_array(str(data), mode="r+")[start:start + len(y)] = y  # one chunk: written to a temp, renamed
        elif self.kind == "npy":
            def write_npy(temp):
                with open(temp, "wb") as handle:
                    np.save(handle, y, allow_pickle=False)
            atomic_write(data / _part_name(index, ".npy"), write_npy)
        else:
            self._write_parquet(data / _part_name(index, ".parquet"), start, y, source)

    def _write_parquet(self, path: Path, start: int, y: np.ndarray, source) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        width = int(np.prod(self.row_shape))
        values = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1), pa.float32()), width)
        if self.keep:
            table = source.read_table(start, start + len(y), self.keep).append_column(OUTPUT_COLUMN, values)
        else:
            table = pa.table({OUTPUT_COLUMN: values})
        table = table.replace_schema_metadata({SHAPE_KEY: json.dumps(list(self.row_shape)).encode()})
        atomic_write(path, lambda temp: pq.write_table(table, temp))

    def publish(self, path: Path, chunks: int, overwrite: bool) -> None:
        """Put the complete output under ``path`` (on the client, after every chunk is written)."""
        data = Path(self.data)
        if self.kind == "npy":
            self._assemble_npy(path, chunks)
            return
        for stray in data.rglob("*"):  # temp files of writes that a killed worker left half done
            if stray.is_file() and (stray.name.endswith(".tmp") or stray.name.endswith(".partial")):
                stray.unlink()
        if path.exists():
            if not overwrite:
                raise InputError(f"{path} exists; pass --overwrite to replace it")
            _remove(path)
        os.replace(data, path)

    def _assemble_npy(self, path: Path, chunks: int) -> None:
        data = Path(self.data)

        def write(temp):
            out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.float32, shape=(self.rows, *self.row_shape))
            start = 0
            for index in range(chunks):  # part by part, never all in memory
                part = np.load(data / _part_name(index, ".npy"), mmap_mode="r")
                out[start:start + len(part)] = part
                start += len(part)
            out.flush()
            del out
        atomic_write(path, write)  # replaces an existing file (checked by the caller) in one rename


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
