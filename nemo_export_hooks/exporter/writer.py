"""Streaming, size-bounded ``safetensors`` shard writer and the Hugging Face shard index.

Why streaming: an export must never hold the whole model in memory.  Each owner rank pushes
its tensors one at a time into a :class:`ShardWriter`, which keeps at most one shard's worth
of tensors (plus the tensor being added) and writes a *part* file as soon as the next tensor
would not fit.  Part files are named per writer (``{prefix}-{k:05d}.safetensors``, e.g.
``rank00003-00002.safetensors``) so several ranks can write into one staging directory
without coordination.  Once all ranks are done, rank 0 calls :func:`finalize_shards` with the
merged key -> part map; it renames the parts to the names ``transformers`` expects
(``model-00001-of-00004.safetensors``) and writes ``model.safetensors.index.json``.

The size limit counts tensor bytes only (as ``transformers`` does); the few kilobytes of
safetensors header come on top.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import uuid
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["parse_size", "ShardWriter", "finalize_shards", "INDEX_NAME", "hf_shard_name"]

INDEX_NAME = "model.safetensors.index.json"
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers checks this key when loading

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.]+$")


def parse_size(s: Union[str, int]) -> int:
    """Parse a shard size such as ``"5GB"`` (10**9 units) or ``"2GiB"`` (2**30 units) to bytes.

    Units are case-insensitive and always mean bytes: B, KB, MB, GB, TB (decimal) and KiB,
    MiB, GiB, TiB (binary); a bare number or an ``int`` is a byte count.  The result must be
    a positive whole number of bytes.  Anything else raises ``ValueError`` naming the value.
    """
    if isinstance(s, bool):  # bool is an int subclass; True bytes is never meant
        raise ValueError(f"invalid size {s!r}: expected an int byte count or a string like '5GB'")
    if isinstance(s, int):
        if s <= 0:
            raise ValueError(f"invalid size {s!r}: must be a positive number of bytes")
        return s
    if not isinstance(s, str):
        raise ValueError(f"invalid size {s!r} ({type(s).__name__}): expected an int or a string like '5GB'")
    m = _SIZE_RE.match(s)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(
            f"invalid size {s!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB' or '2GiB'"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"invalid size {s!r}: must be at least one byte")
    if value != int(value):
        raise ValueError(f"invalid size {s!r}: is not a whole number of bytes")
    return int(value)


def hf_shard_name(k: int, n: int) -> str:
    """The ``transformers`` shard name for shard ``k`` (1-based) of ``n``."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems refuse fsync on directories; files must succeed
            raise
    finally:
        os.close(fd)


class ShardWriter:
    """Buffer tensors and write them as size-bounded safetensors part files.

    ``add`` flushes the buffer into a new part whenever adding the next tensor would take
    the shard over ``max_shard_bytes``; a tensor bigger than the limit gets a part of its
    own.  Parts are written under a temporary hidden name, fsynced and then ``os.replace``-d
    to ``f"{prefix}-{k:05d}.safetensors"`` (k from 1), so a part file that exists is complete.

    After :meth:`close` (which returns ``{tensor name: part filename}``), ``files`` lists the
    part filenames in order, ``num_tensors`` counts tensors and ``total_bytes`` sums their
    bytes.  Usable as a context manager (closes on success, drops the buffer on error).

    The writer keeps a *reference* to each added tensor until its part is written: do not
    modify a tensor in place after adding it (copy first if you reuse a buffer).
    """

    def __init__(self, directory: Union[str, Path], max_shard_bytes: int, prefix: str = "part"):
        directory = Path(directory)
        if not directory.is_dir():
            raise NotADirectoryError(f"shard directory {directory} does not exist or is not a directory")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(
                f"max_shard_bytes must be a positive int (use parse_size for strings), got {max_shard_bytes!r}"
            )
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or prefix.startswith("."):
            raise ValueError(
                f"invalid shard prefix {prefix!r}: use letters, digits, '_' or '.', not starting with '.'"
            )
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.total_bytes = 0
        self.num_tensors = 0
        self.files: list[str] = []
        self._key_to_part: dict[str, str] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._closed = False

    # -- public -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; may write a part file first to stay in bounds."""
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.directory}, prefix={self.prefix!r}) is closed; cannot add {name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._key_to_part or name in self._buffer:
            raise ValueError(f"duplicate tensor name {name!r}: it was already added to this writer")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; move it to CPU before writing")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be written")
        tensor = self._own(tensor.detach())
        nbytes = tensor.numel() * tensor.element_size()

        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        if tensor.numel():
            self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        self.total_bytes += nbytes
        self.num_tensors += 1
        if self._buffer_bytes >= self.max_shard_bytes:  # full (or one oversize tensor): write now
            self._flush()

    def close(self) -> dict[str, str]:
        """Write what is buffered and return ``{tensor name: part filename}``.  Idempotent."""
        if not self._closed:
            if self._buffer:
                self._flush()
            if self.files:
                _fsync_path(self.directory, directory=True)
            self._closed = True
        return dict(self._key_to_part)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # drop the buffer; finished parts stay for the caller to clean with the staging dir
            self._buffer.clear()
            self._buffer_storages.clear()
            self._closed = True

    # -- internals ----------------------------------------------------------------------
    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """Return a contiguous tensor that owns its whole storage and shares none with the buffer.

        A view (a QKV slice, a gate/up half) keeps its whole base storage alive, which would
        break the one-shard memory bound, and safetensors refuses tensors that overlap in
        memory (e.g. tied weights added under two names).  Such tensors are copied.
        """
        if not t.is_contiguous():
            return t.contiguous()
        if t.numel() == 0:
            return t
        storage = t.untyped_storage()
        owns_all = t.data_ptr() == storage.data_ptr() and storage.nbytes() == t.numel() * t.element_size()
        if not owns_all or storage.data_ptr() in self._buffer_storages:
            return t.clone(memory_format=torch.contiguous_format)
        return t

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self.files) + 1
        part = f"{self.prefix}-{k:05d}.safetensors"
        final = self.directory / part
        tmp = self.directory / f".{part}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            raise FileExistsError(
                f"part file {final} already exists; is another writer using prefix {self.prefix!r} in this directory?"
            )
        try:
            save_file(self._buffer, str(tmp), metadata=dict(_SAFETENSORS_METADATA))
            _fsync_path(tmp)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        for name in self._buffer:
            self._key_to_part[name] = part
        self.files.append(part)
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()


def _read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path} has an implausible safetensors header length {n}")
        header = f.read(n)
        if len(header) != n:
            raise ValueError(f"{path} has a truncated safetensors header")
    try:
        return json.loads(header)
    except ValueError as e:
        raise ValueError(f"{path} has an unparseable safetensors header: {e}") from None


def _tensor_bytes(header: dict) -> int:
    return sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])


def finalize_shards(
    directory: Union[str, Path], key_to_part: dict[str, str], total_size: Optional[int] = None
) -> dict:
    """Rename part files to ``model-{k:05d}-of-{n:05d}.safetensors`` and write the index.

    ``key_to_part`` is the merged ``{tensor name: part filename}`` of every writer (every
    rank).  Parts are numbered in sorted part-filename order, so the result is the same for
    the same inputs whatever order the ranks reported in.  The index is always written, even
    for one shard (``transformers`` loads a sharded checkpoint of one shard).  ``total_size``
    defaults to the sum of tensor bytes read from the part headers.  Returns the index dict.
    """
    directory = Path(directory)
    if not key_to_part:
        raise ValueError(f"no tensors to finalize in {directory}: key_to_part is empty")
    parts = sorted(set(key_to_part.values()))
    for part in parts:
        if not isinstance(part, str) or Path(part).name != part or part.startswith("."):
            raise ValueError(f"invalid part filename {part!r} in key_to_part: expected a plain file name")
        if not (directory / part).is_file():
            raise FileNotFoundError(f"part file {directory / part} named in key_to_part does not exist")
    if (directory / INDEX_NAME).exists():
        raise FileExistsError(f"{directory / INDEX_NAME} already exists; shards were already finalized?")

    n = len(parts)
    rename = {part: hf_shard_name(k, n) for k, part in enumerate(parts, start=1)}
    for part, target in rename.items():
        if target != part and target not in rename and (directory / target).exists():
            raise FileExistsError(f"cannot rename {part} to {target}: {directory / target} already exists")

    if total_size is None:
        total_size = sum(_tensor_bytes(_read_safetensors_header(directory / p)) for p in parts)
    elif isinstance(total_size, bool) or not isinstance(total_size, int) or total_size < 0:
        raise ValueError(f"total_size must be a non-negative int or None, got {total_size!r}")

    # Two phases, so a part whose name is another part's target cannot be overwritten.
    token = uuid.uuid4().hex[:8]
    moves = [(part, target) for part, target in rename.items() if part != target]
    for part, _ in moves:
        os.replace(directory / part, directory / f".{part}.finalize-{token}")
    for part, target in moves:
        os.replace(directory / f".{part}.finalize-{token}", directory / target)

    index = {
        "metadata": {"total_size": int(total_size)},
        "weight_map": {key: rename[key_to_part[key]] for key in sorted(key_to_part)},
    }
    tmp = directory / f".{INDEX_NAME}.tmp-{token}"
    with open(tmp, "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / INDEX_NAME)
    _fsync_path(directory, directory=True)
    return index
