"""Size-bounded ``safetensors`` part files written header first, in parallel, and the index.

Why header first: the export plan knows every tensor's name, dtype and shape before a byte
is converted (``execute.describe``), so a :class:`ShardWriter` is given that *layout* up
front.  It assigns the tensors to part files, computes each part's exact safetensors header
and every tensor's offset, creates the parts (hidden temporary names) with their headers,
and then each added tensor's bytes are ``pwrite``-n straight to where they stay: no header
reserve, no rewrite, no layout remembered from an earlier export, so the first export of a
process costs what later ones do.

Why parallel: one writer thread doing write + fsync does not reach a disk's durable rate
(on the H200 host: 1 writer 1.24 GB/s, 8 writers 2.25 GB/s).  With ``writers=N`` the rank's
tensors are spread over at least ``N`` parts (when there are enough bytes: parts are at
least ``min_part_bytes``), balanced by bytes in arrival order, and each part is written,
hashed and fsynced by one of ``N`` threads.  ``writers=1`` writes in the caller's thread.

sha256 is computed as the bytes go out, for the manifest (nobody reads the shards back
afterwards): from memory for a tensor that continues the part's hashed prefix, else read
back from the page cache as soon as the gap before it is filled.  Writeback is started
every 64 MiB (``sync_file_range`` on Linux); a part is fsynced and renamed into place once
its last tensor is written, so a part file that exists is complete and durable.

File layout: exactly what ``safetensors.torch.save_file`` writes (8-byte header length, JSON
header padded with spaces to a multiple of 8, tensor bytes) except the order of the tensors:
by safetensors' dtype order (wide types first, so every tensor is aligned to its element
size), then in the order of the layout (``save_file`` orders by name instead; given in name
order the bytes are identical).

Part files are named per writer (``{prefix}-{k:05d}.safetensors``, e.g.
``rank00003-00002.safetensors``) so several ranks can write into one staging directory
without coordination.  Once all ranks are done, rank 0 calls :func:`finalize_shards` with the
merged key -> part map; it renames the parts to the names ``transformers`` expects
(``model-00001-of-00004.safetensors``) and writes ``model.safetensors.index.json``.

The size limit counts tensor bytes only (as ``transformers`` does); the header comes on top.

Profile: every part sums, in the thread that writes it, the seconds it spends in ``pwrite``
(and starting writeback), hashing (incl. read-back), fsync and rename; after :meth:`close`,
``ShardWriter.timings`` gives them per writer thread (``WRITER_PHASES``), which is what an
export reports in ``ExportResult.phases``.  Two ``perf_counter`` calls per step: nothing
measurable next to the I/O.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import torch

from ..store.fs import known_digest, read_safetensors_header, remember_digest
from ..store.layout import INDEX_NAME

__all__ = ["WRITER_PHASES", "parse_size", "ShardWriter", "assign_parts", "default_writers", "finalize_shards", "final_shard_names", "known_digest", "INDEX_NAME", "hf_shard_name"]

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


# -- safetensors encoding -----------------------------------------------------------------
_ST_DTYPES: dict = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code

# seconds per writer thread, in the order a part goes through them (see ShardWriter.timings)
WRITER_PHASES = ("pwrite_s", "hash_s", "fsync_s", "rename_s")

_CHUNK = 64 << 20  # bytes per write() call, and how often writeback is started
_HASH_CHUNK = 8 << 20  # read-back buffer for hashing tensors written out of order
MIN_PART_BYTES = 256 << 20  # parts added for parallelism are at least this big
STREAM_INFLIGHT_BYTES = 1 << 30  # a streamed (sync) export: tensors queued for the writer threads, at most


def default_writers() -> int:
    """Parallel part files (and writer threads) per rank: up to 8 (the H200 host's disk
    reached its best durable rate with 8 writers), at most the cores per local rank."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local)))

# safetensors' dtype order (its Rust ``Dtype`` enum, descending), which ``save_file`` sorts
# tensors by before their names; checked against ``save_file`` in tests/test_writer.py.
_ST_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
             "F8_E8M0", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I8", "U8", "BOOL"]
_ST_RANK = {code: i for i, code in enumerate(_ST_ORDER)}


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


try:  # Linux: start writeback of a byte range early, so the final fsync has little left
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except Exception:  # pragma: no cover - not Linux / no libc symbol
    _sync_file_range = None
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # whole file; advisory: errors ignored


def _write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    """``pwrite`` all of ``data`` at ``offset``; errors name the file."""
    pos = 0
    n = len(data)
    while pos < n:
        end = min(n, pos + _CHUNK)
        try:
            written = os.pwrite(fd, data[pos:end], offset + pos)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path.name} in {path.parent}: {e.strerror}") from e
        if written <= 0:  # pragma: no cover - pwrite reports errors by raising
            raise OSError(errno.EIO, f"cannot write {path.name} in {path.parent}: short write")
        pos += written


# Digests of the part files written by this process, by file identity, live in
# ``store.fs`` (``remember_digest`` / ``known_digest``): write_manifest() looks them up so
# that rank 0 does not read back and hash the shards it has just written.


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # pragma: no cover - platforms without preadv
    view[: len(data)] = data
    return len(data)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _normalize_layout(layout) -> list[tuple[str, str, tuple, int]]:
    """``[(name, torch dtype, shape)]`` -> ``[(name, safetensors dtype, shape, nbytes)]``."""
    out, seen = [], set()
    for item in layout:
        name, dtype, shape = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r} in the writer's layout")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        seen.add(name)
        shape = tuple(int(s) for s in shape)
        out.append((name, _ST_DTYPES[dtype], shape, math.prod(shape) * torch.empty((), dtype=dtype).element_size()))
    return out


def assign_parts(sizes: list[int], max_part_bytes: int, min_parts: int) -> list[list[int]]:
    """Tensor indices per part: at least ``min_parts`` parts (and as many as the size limit
    needs), each tensor, in order, to the part with the fewest bytes that it fits in (a
    tensor bigger than the limit gets a part of its own), so that parts fill at the same
    pace and their writers work side by side."""
    if not sizes:
        return []
    bounded = sum(s for s in sizes if s <= max_part_bytes)  # an oversize tensor opens its own part
    n = max(1, min_parts, -(-bounded // max_part_bytes))
    parts: list[list[int]] = [[] for _ in range(n)]
    fill = [0] * n
    for i, size in enumerate(sizes):
        best = None
        for p in range(len(parts)):
            if (not parts[p] or fill[p] + size <= max_part_bytes) and (best is None or fill[p] < fill[best]):
                best = p
        if best is None:
            parts.append([])
            fill.append(0)
            best = len(parts) - 1
        parts[best].append(i)
        fill[best] += size
    return [p for p in parts if p]


class _Entry:
    __slots__ = ("name", "dtype", "shape", "nbytes", "part", "index", "offset", "queued", "written")

    def __init__(self, name, dtype, shape, nbytes):
        self.name, self.dtype, self.shape, self.nbytes = name, dtype, shape, nbytes
        self.part: Optional["_Part"] = None
        self.index = self.offset = 0
        self.queued = self.written = False


def _header(entries: list) -> bytes:
    """The safetensors header of ``entries`` in file order, as ``save_file`` writes it."""
    header: dict = {"__metadata__": dict(_SAFETENSORS_METADATA)}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # JSON allows trailing whitespace; safetensors pads so too
    return struct.pack("<Q", len(raw)) + raw


class _Part:
    """One part file: created with its exact header; tensors are written at their offsets in
    any order; the hash follows the written prefix; fsync + rename when the last one lands."""

    def __init__(self, directory: Path, part: str, entries: list):
        self.part = part
        self.final = directory / part
        self.tmp = directory / f".{part}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.final.exists():
            raise FileExistsError(
                f"part file {self.final} already exists; is another writer using this prefix in this directory?"
            )
        self.entries = sorted(entries, key=lambda e: _ST_RANK.get(e.dtype, len(_ST_RANK)))  # stable: layout order
        header = _header(self.entries)
        pos = len(header)
        for i, e in enumerate(self.entries):
            e.part, e.index, e.offset = self, i, pos
            pos += e.nbytes
        self.size = pos
        self.data_bytes = pos - len(header)
        self.remaining = len(self.entries)
        self.hashed = 0  # entries [0, hashed) are in the digest
        self.since_writeback = 0
        self.sha = hashlib.sha256(header)
        self.digest: Optional[str] = None
        self.seconds = dict.fromkeys(WRITER_PHASES, 0.0)  # summed by the one thread that writes this part
        try:
            self.fd: Optional[int] = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot create a shard file in {directory}: {e.strerror}") from e
        try:
            t0 = time.perf_counter()
            _write_all(self.fd, memoryview(header), 0, self.final)
            self.seconds["pwrite_s"] += time.perf_counter() - t0
        except BaseException:
            self.discard()
            raise

    def write(self, e: _Entry, t: torch.Tensor) -> bool:
        """Write one tensor; True when the part is complete (fsynced and renamed)."""
        clock, sec = time.perf_counter, self.seconds
        t0 = clock()
        data = _byte_view(t)
        _write_all(self.fd, data, e.offset, self.final)
        e.written = True
        t1 = clock()
        if e.index == self.hashed:  # continues the hashed prefix: hash it from memory
            self.sha.update(data)
            self.hashed += 1
        self._hash_written()
        t2 = clock()
        self.remaining -= 1
        self.since_writeback += e.nbytes
        if self.since_writeback >= _CHUNK:
            _start_writeback(self.fd)
            self.since_writeback = 0
        sec["pwrite_s"] += (t1 - t0) + (clock() - t2)
        sec["hash_s"] += t2 - t1
        if self.remaining == 0:
            self._commit()
            return True
        return False

    def _hash_written(self) -> None:
        """Extend the digest over entries written earlier, out of order (read back from the
        page cache: they were just written)."""
        buf = None
        while self.hashed < len(self.entries) and self.entries[self.hashed].written:
            e = self.entries[self.hashed]
            pos, end = e.offset, e.offset + e.nbytes
            while pos < end:
                if buf is None:
                    # one buffer for every entry read back now, sized for the largest of them:
                    # a buffer sized by the first (often a 4-byte scale) made the weights after
                    # it read back 4 bytes a call (5.6 M preads, 44 s for a 3.7 GB FP8 export)
                    buf = memoryview(bytearray(min(_HASH_CHUNK, max(1, self._readback_bytes()))))
                n = _pread_into(self.fd, buf[: min(len(buf), end - pos)], pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"unexpected end of {self.final.name} at byte {pos} while hashing")
                self.sha.update(buf[:n])
                pos += n
            self.hashed += 1

    def _readback_bytes(self) -> int:
        """The largest entry, from the first not yet hashed on, already written."""
        biggest = 0
        for e in self.entries[self.hashed :]:
            if not e.written:
                break
            biggest = max(biggest, e.nbytes)
        return biggest

    def _commit(self) -> None:
        assert self.hashed == len(self.entries)
        t0 = time.perf_counter()
        self.digest = self.sha.hexdigest()
        t1 = time.perf_counter()
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.final.name} in {self.final.parent} (fsync): {e.strerror}") from e
        os.close(self.fd)
        self.fd = None
        t2 = time.perf_counter()
        os.replace(self.tmp, self.final)
        remember_digest(self.final, self.digest)
        self.seconds["hash_s"] += t1 - t0
        self.seconds["fsync_s"] += t2 - t1
        self.seconds["rename_s"] += time.perf_counter() - t2

    def discard(self) -> None:
        """Drop this part if it is not complete: close, delete the temporary file."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        _unlink_quietly(self.tmp)

    def __del__(self):  # an abandoned writer must not leak descriptors
        fd = getattr(self, "fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class ShardWriter:
    """Write the tensors of a known ``layout`` into size-bounded safetensors part files.

    ``layout`` is ``[(name, torch dtype, shape), ...]``: every tensor that will be added.
    The parts (``f"{prefix}-{k:05d}.safetensors"``, k from 1; see :func:`assign_parts`) are
    created at once under hidden temporary names with their final headers; :meth:`add`
    checks a tensor against the layout and writes its bytes at their offset (in the
    caller's thread with ``writers=1``, else queued to one of ``writers`` threads, each
    owning some parts).  A part is fsynced and ``os.replace``-d to its name as soon as its
    last tensor is written, so a part file that exists is complete.  A tensor bigger than
    the limit gets a part of its own.

    Memory: with threads, the tensors queued and not yet written (their references), at
    most ``max_inflight_bytes`` (``add`` waits; ``None``: no bound, for tensors that stay in
    memory anyway such as a host snapshot); plus an 8 MiB read-back buffer while hashing.

    ``timings`` (after :meth:`close`): ``{phase: seconds}`` for ``WRITER_PHASES``, summed
    over the parts and divided by the writer threads (1 when writing in the caller's
    thread), i.e. the mean writer thread's busy time per phase.  With threads they run
    beside the caller's conversion, so they are a breakdown of the write, not terms to add
    to the caller's time.

    After :meth:`close` (which returns ``{tensor name: part filename}`` and raises if a
    tensor of the layout was never added), ``files`` lists the part filenames in order,
    ``num_tensors`` counts tensors, ``total_bytes`` sums their bytes and ``digests`` maps each
    part filename to ``{"bytes", "sha256"}`` of the whole file (what the export manifest
    records; see :func:`final_shard_names` for their published names).  Usable as a context
    manager (closes on success, discards unfinished parts on error).

    Errors (a full disk, a read-only or vanished directory) name the file and directory;
    the temporary files of unfinished parts are removed before the error propagates.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        max_shard_bytes: int,
        prefix: str = "part",
        *,
        layout,
        writers: int = 1,
        min_part_bytes: int = MIN_PART_BYTES,
        max_inflight_bytes: Optional[int] = 1 << 30,
    ):
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
        if isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise ValueError(f"writers must be a positive int, got {writers!r}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.total_bytes = 0
        self.num_tensors = 0
        self.digests: dict[str, dict] = {}
        self.timings: dict[str, float] = dict.fromkeys(WRITER_PHASES, 0.0)
        self._closed = False
        self._error: Optional[BaseException] = None
        self._lock = threading.Condition()
        self._inflight = 0
        self._max_inflight = max_inflight_bytes
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.SimpleQueue] = []
        self._parts: list[_Part] = []
        entries = [_Entry(*e) for e in _normalize_layout(layout)]
        self._entries = {e.name: e for e in entries}
        total = sum(e.nbytes for e in entries)
        groups = assign_parts([e.nbytes for e in entries], max_shard_bytes, min(writers, total // max(1, min_part_bytes)))
        self.files = [f"{prefix}-{k:05d}.safetensors" for k in range(1, len(groups) + 1)]
        try:
            for name, idx in zip(self.files, groups):
                self._parts.append(_Part(directory, name, [entries[i] for i in idx]))
        except BaseException:
            self._abort()
            raise
        n_threads = min(writers, len(self._parts))
        self._n_threads = max(1, n_threads)
        if n_threads > 1:
            for k in range(n_threads):
                q: queue.SimpleQueue = queue.SimpleQueue()
                th = threading.Thread(target=self._work, args=(q,), daemon=True, name=f"shard-writer-{k}")
                self._queues.append(q)
                self._threads.append(th)
                th.start()
        self._queue_of = {id(p): (i % n_threads) for i, p in enumerate(self._parts)} if self._threads else {}

    # -- public -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``name`` (one of the layout's tensors, same dtype and shape)."""
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.directory}, prefix={self.prefix!r}) is closed; cannot add {name!r}")
        self._raise_worker_error()
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; move it to CPU before writing")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be written")
        e = self._entries.get(name)
        if e is None:
            raise ValueError(f"tensor {name!r} is not in the layout this writer was given")
        if e.queued:
            raise ValueError(f"duplicate tensor name {name!r}: it was already added to this writer")
        got = (_ST_DTYPES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
        if got != (e.dtype, e.shape):
            raise ValueError(f"tensor {name!r} is {got[0]} {list(got[1])}, but the layout says {e.dtype} {list(e.shape)}")
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        e.queued = True
        self.total_bytes += e.nbytes
        self.num_tensors += 1
        if not self._threads:
            try:
                e.part.write(e, tensor)
            except BaseException:
                self._abort()
                raise
            return
        with self._lock:
            while (self._max_inflight is not None and self._inflight > 0 and self._inflight + e.nbytes > self._max_inflight
                   and self._error is None):
                self._lock.wait()
            self._inflight += e.nbytes
        self._queues[self._queue_of[id(e.part)]].put((e, tensor))
        self._raise_worker_error()

    def close(self) -> dict[str, str]:
        """Wait for every part to be written, hashed, fsynced and renamed; return
        ``{tensor name: part filename}``.  Idempotent."""
        if self._closed:
            return {n: e.part.part for n, e in self._entries.items()}
        try:
            self._stop_threads()
            self._raise_worker_error()
            missing = [n for n, e in self._entries.items() if not e.written]
            if missing:
                raise ValueError(f"{len(missing)} tensors of the layout were never added, e.g. {missing[:3]}")
            for p in self._parts:
                self.digests[p.part] = {"bytes": p.size, "sha256": p.digest}
            for k in WRITER_PHASES:
                self.timings[k] = sum(p.seconds[k] for p in self._parts) / self._n_threads
            if self._parts:
                t0 = time.perf_counter()
                _fsync_path(self.directory, directory=True)
                self.timings["rename_s"] += time.perf_counter() - t0  # makes the renames durable
        except BaseException:
            self._abort()
            raise
        self._closed = True
        return {n: e.part.part for n, e in self._entries.items()}

    def abort(self) -> None:
        """Discard unfinished parts (their temporary files); finished parts stay for the
        caller to remove with the staging directory.  The writer is closed afterwards."""
        self._abort()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    # -- internals ----------------------------------------------------------------------
    def _work(self, q: "queue.SimpleQueue") -> None:
        while True:
            item = q.get()
            if item is None:
                return
            e, t = item
            try:
                if self._error is None:
                    e.part.write(e, t)
            except BaseException as err:  # reported by add() / close()
                with self._lock:
                    if self._error is None:
                        self._error = err
            finally:
                del t, item
                with self._lock:
                    self._inflight -= e.nbytes
                    self._lock.notify_all()

    def _stop_threads(self) -> None:
        for q in self._queues:
            q.put(None)
        for th in self._threads:
            th.join()
        self._threads, self._queues = [], []

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            err = self._error
            self._abort()
            raise err

    def _abort(self) -> None:
        if self._threads:
            with self._lock:
                if self._error is None:
                    self._error = RuntimeError("writer aborted")
                self._lock.notify_all()
            self._stop_threads()
        for part in self._parts:
            if part.digest is None:
                part.discard()
        self._closed = True


def final_shard_names(parts) -> dict[str, str]:
    """``{part filename: published name}`` for the merged part files of every writer: parts
    are numbered in sorted order, ``model-{k:05d}-of-{n:05d}.safetensors``.  Use it to carry
    ``ShardWriter.digests`` over to the names :func:`finalize_shards` gives the files."""
    parts = sorted(set(parts))
    return {part: hf_shard_name(k, len(parts)) for k, part in enumerate(parts, start=1)}


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

    rename = final_shard_names(parts)
    for part, target in rename.items():
        if target != part and target not in rename and (directory / target).exists():
            raise FileExistsError(f"cannot rename {part} to {target}: {directory / target} already exists")

    if total_size is None:
        total_size = sum(_tensor_bytes(read_safetensors_header(directory / p)) for p in parts)
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
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / INDEX_NAME)
    except OSError as e:  # a bare ENOSPC names no file: name the index
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(e.errno, f"cannot write {directory / INDEX_NAME}: {e.strerror or e}") from e
    _fsync_path(directory, directory=True)
    return index
