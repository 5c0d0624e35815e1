"""Streaming, size-bounded ``safetensors`` shard writer and the Hugging Face shard index.

Why streaming: an export must never hold the whole model in memory.  Each owner rank pushes
its tensors one at a time into a :class:`ShardWriter`, which writes each tensor's bytes
straight into the current *part* file (no copy, no reference kept: memory is the tensor
being added) behind space reserved for the safetensors header, and starts a new part when
the next tensor would not fit.  A full part gets its header written into the reserve, its
sha256 computed in a background thread from the page cache (for the manifest, so nobody
reads the shards back afterwards) while the next part is written, then it is fsynced and
renamed into place.  From the second export of the same model on, a part's header is known
from the previous export's layout when its first tensor arrives: it is written first and
the hash follows the writes instead of starting after them (any difference falls back).  Writeback is started every 64 MiB (``sync_file_range`` on Linux), so
the disk works while later tensors are still being converted.

Part files are named per writer (``{prefix}-{k:05d}.safetensors``, e.g.
``rank00003-00002.safetensors``) so several ranks can write into one staging directory
without coordination.  Once all ranks are done, rank 0 calls :func:`finalize_shards` with the
merged key -> part map; it renames the parts to the names ``transformers`` expects
(``model-00001-of-00004.safetensors``) and writes ``model.safetensors.index.json``.

File layout: a valid safetensors file (8-byte header length, JSON header padded with spaces,
tensor bytes).  The header reserve is a whole number of pages, so tensor data starts on a
page boundary; tensors follow in the order they were added.  If the header outgrows its
reserve, or a tensor would not be aligned to its element size, the part is rewritten (an
in-kernel copy) with an exact header and tensors sorted by element size, as
``safetensors.save_file`` lays them out.

The size limit counts tensor bytes only (as ``transformers`` does); the header comes on top.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["parse_size", "ShardWriter", "finalize_shards", "final_shard_names", "known_digest", "INDEX_NAME", "hf_shard_name"]

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

_CHUNK = 64 << 20  # bytes per write() call, and how often writeback is started
_HASH_CHUNK = 8 << 20
_ALIGN = 4096  # data region starts on a page boundary (mmap-friendly, all dtypes aligned)
_MAX_HEADER_RESERVE = 1 << 20


def _header_reserve(max_shard_bytes: int) -> int:
    """Bytes reserved at the start of a part for its header (8-byte length + JSON).

    Tensors are written as they arrive, behind this reserve; the header is written into it
    when the part is complete.  About one entry (~130 bytes) per 64 KiB of shard, at least
    one page, at most 1 MiB; a header that does not fit (many tiny tensors) makes the part
    be rewritten with an exact header (:meth:`_Part._rewrite`), which costs one extra
    in-kernel copy of that part.
    """
    want = max(_ALIGN, min(_MAX_HEADER_RESERVE, max_shard_bytes // 512))
    return -(-want // _ALIGN) * _ALIGN


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


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


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


# Digests of the part files written by this process, by file identity.  write_manifest()
# looks them up (``known_digest``) so that rank 0 does not read back and hash, after the
# fact, the shards it has just written.  An entry is used only while the file still has the
# device, inode, size and mtime it had when its bytes were hashed.
_DIGESTS: "OrderedDict[tuple, str]" = OrderedDict()
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 1 << 16


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _remember_digest(path: Path, sha256: str) -> None:
    key = _identity(os.stat(path))
    with _DIGESTS_LOCK:
        _DIGESTS[key] = sha256
        while len(_DIGESTS) > _DIGESTS_MAX:
            _DIGESTS.popitem(last=False)


def known_digest(path: Union[str, Path]) -> Optional[str]:
    """sha256 of ``path`` if a :class:`ShardWriter` of this process wrote it and it has not
    changed since (same device, inode, size and mtime), else ``None``."""
    try:
        key = _identity(os.stat(path))
    except OSError:
        return None
    with _DIGESTS_LOCK:
        return _DIGESTS.get(key)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # pragma: no cover - platforms without preadv
    view[: len(data)] = data
    return len(data)


class _Hasher(threading.Thread):
    """sha256 of a growing file region, read back with ``pread`` (from the page cache: the
    bytes were just written) in a thread of its own; ``hashlib`` releases the GIL, so this
    overlaps the writer.  It hashes up to the byte the writer has reported (:meth:`advance`)
    and stops at the final size (:meth:`finish`), so with a header known up front it follows
    the writer instead of starting after it."""

    def __init__(self, fd: int, size: Optional[int] = None):
        super().__init__(daemon=True, name="shard-sha256")
        self.fd = fd
        self.limit = size or 0
        self.final = size
        self.cancelled = False
        self.cond = threading.Condition()
        self.digest: Optional[str] = None
        self.error: Optional[BaseException] = None

    def advance(self, limit: int) -> None:
        with self.cond:
            self.limit = limit
            self.cond.notify()

    def finish(self, size: int) -> None:
        with self.cond:
            self.limit = self.final = size
            self.cond.notify()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            buf = bytearray(_HASH_CHUNK)
            view = memoryview(buf)
            pos = 0
            while True:
                with self.cond:
                    while not self.cancelled and pos >= self.limit and (self.final is None or pos < self.final):
                        self.cond.wait()
                    if self.cancelled:
                        return
                    if self.final is not None and pos >= self.final:
                        break
                    end = min(self.limit, pos + len(buf))
                n = _pread_into(self.fd, view[: end - pos], pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"unexpected end of file at byte {pos} while hashing")
                h.update(view[:n])
                pos += n
            self.digest = h.hexdigest()
        except BaseException as e:  # reported by result()
            self.error = e

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


# Layouts of the parts written before, by the part's first tensor: an export repeats the
# previous one's tensors (same model, same plan), so the header of a part is usually known
# as soon as its first tensor arrives.  It is then written first and the hash follows the
# writes; any difference from the prediction falls back to writing the header at the end.
_LAYOUTS: "OrderedDict[tuple, list]" = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
_LAYOUTS_MAX = 1 << 12


def _layout_key(prefix: str, max_bytes: int, name: str, dtype: str, shape) -> tuple:
    return (prefix, max_bytes, name, dtype, tuple(shape))


class _Part:
    """One part file being written: tensors are written where they will stay, behind a
    header written first when it is predictable (see ``_LAYOUTS``), else into a reserve at
    :meth:`seal`."""

    def __init__(self, directory: Path, part: str, reserve: int, predicted: Optional[list] = None):
        self.part = part
        self.final = directory / part
        self.tmp = directory / f".{part}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.final.exists():
            raise FileExistsError(
                f"part file {self.final} already exists; is another writer using this prefix in this directory?"
            )
        try:
            self.fd: Optional[int] = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot create a shard file in {directory}: {e.strerror}") from e
        self.reserve = reserve
        self.entries: list[tuple[str, str, list, int, int, int]] = []  # name, dtype, shape, start, end, itemsize
        self.data_bytes = 0
        self.aligned = True
        self._unsynced_from = 0  # data offset from which writeback has not been started
        self.size = 0
        self.hasher: Optional[_Hasher] = None
        self.predicted: Optional[list] = None  # [(name, dtype, shape, nbytes)], header already written
        self.rewritten = False
        if predicted:
            try:
                self._write_predicted_header(predicted)
            except BaseException:
                self.discard()
                raise

    def _write_predicted_header(self, predicted: list) -> None:
        entries, pos = [], 0
        for name, dtype, shape, nbytes in predicted:
            entries.append((name, dtype, list(shape), pos, pos + nbytes, 0))
            pos += nbytes
        exact = self._header(entries, None)
        self.reserve = max(self.reserve, -(-len(exact) // _ALIGN) * _ALIGN)
        header = self._header(entries, self.reserve)
        _write_all(self.fd, memoryview(header), 0, self.final)
        self.predicted = predicted
        self.hasher = _Hasher(self.fd)
        self.hasher.start()
        self.hasher.advance(self.reserve)

    def _mispredicted(self) -> None:
        self.predicted = None
        if self.hasher is not None:
            self.hasher.cancel()
            self.hasher = None

    def write(self, name: str, t: torch.Tensor) -> None:
        data = _byte_view(t)
        start = self.data_bytes
        dtype = _ST_DTYPES[t.dtype]
        if self.predicted is not None:
            i = len(self.entries)
            if i >= len(self.predicted) or self.predicted[i][:3] != (name, dtype, tuple(t.shape)):
                self._mispredicted()
        _write_all(self.fd, data, self.reserve + start, self.final)
        itemsize = t.element_size()
        if itemsize and start % itemsize:
            self.aligned = False
        self.entries.append((name, dtype, list(t.shape), start, start + len(data), itemsize))
        self.data_bytes += len(data)
        if self.hasher is not None:
            self.hasher.advance(self.reserve + self.data_bytes)
        if self.data_bytes - self._unsynced_from >= _CHUNK:
            _start_writeback(self.fd, self.reserve + self._unsynced_from, self.data_bytes - self._unsynced_from)
            self._unsynced_from = self.data_bytes

    def layout(self) -> list:
        return [(n, d, tuple(s), e - b) for n, d, s, b, e, _ in self.entries]

    def _header(self, entries, padded_to: Optional[int]) -> bytes:
        header: dict = {"__metadata__": dict(_SAFETENSORS_METADATA)}
        for name, dtype, shape, start, end, _ in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        total = 8 + len(raw)
        target = padded_to if padded_to is not None else -(-total // 8) * 8
        if total > target:
            return b""
        raw += b" " * (target - total)  # JSON allows trailing whitespace; safetensors pads so too
        return struct.pack("<Q", len(raw)) + raw

    def seal(self) -> None:
        """Complete the header and the hash (started now, or following the writes since the
        header was predicted); start writeback of what is left."""
        if self.predicted is not None and len(self.entries) == len(self.predicted):
            self.size = self.reserve + self.data_bytes  # the header written first is exact
            self.hasher.finish(self.size)
            _start_writeback(self.fd, self.reserve + self._unsynced_from, self.data_bytes - self._unsynced_from)
            return
        self._mispredicted()
        header = self._header(self.entries, self.reserve) if self.aligned else b""
        if header:
            _write_all(self.fd, memoryview(header), 0, self.final)
            self.size = self.reserve + self.data_bytes
        else:  # the header outgrew its reserve, or a tensor is not aligned to its dtype
            self._rewrite()
            self.rewritten = True
        _start_writeback(self.fd, 0, self.size)
        self.hasher = _Hasher(self.fd, self.size)
        self.hasher.start()

    def _rewrite(self) -> None:
        """Rewrite the part with an exact header and tensors ordered by decreasing element
        size (every tensor aligned, like ``safetensors.save_file``), copying the tensor bytes
        from the first file in the kernel."""
        order = sorted(self.entries, key=lambda e: (-e[5], e[0]))
        moved, pos = [], 0
        for name, dtype, shape, start, end, itemsize in order:
            moved.append((name, dtype, shape, pos, pos + end - start, itemsize, start))
            pos += end - start
        header = self._header([m[:6] for m in moved], None)
        tmp2 = self.tmp.with_name(self.tmp.name + "-2")
        fd2 = os.open(tmp2, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        src = os.open(self.tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            _write_all(fd2, memoryview(header), 0, self.final)
            base = len(header)
            for _, _, _, new_start, new_end, _, old_start in moved:
                _copy_range(src, self.reserve + old_start, fd2, base + new_start, new_end - new_start, self.final)
            os.replace(tmp2, self.tmp)
        except BaseException:
            os.close(fd2)
            _unlink_quietly(tmp2)
            raise
        finally:
            os.close(src)
        os.close(self.fd)
        self.fd = fd2
        self.size = base + pos

    def commit(self) -> str:
        """Wait for the hash, fsync, rename into place; return the sha256."""
        assert self.hasher is not None and self.fd is not None
        digest = self.hasher.result()
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.final.name} in {self.final.parent} (fsync): {e.strerror}") from e
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.final)
        _remember_digest(self.final, digest)
        return digest

    def discard(self) -> None:
        """Drop this part: stop a running hash, close, delete the temporary file."""
        if self.hasher is not None:
            self.hasher.cancel()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        _unlink_quietly(self.tmp)
        _unlink_quietly(self.tmp.with_name(self.tmp.name + "-2"))

    def __del__(self):  # an abandoned writer must not leak descriptors
        fd = getattr(self, "fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int, path: Path) -> None:
    copied = 0
    while copied < n:
        try:
            if hasattr(os, "copy_file_range"):
                k = os.copy_file_range(src, dst, n - copied, src_off + copied, dst_off + copied)
            else:  # pragma: no cover - non-Linux
                raise OSError(errno.ENOSYS, "copy_file_range unavailable")
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                raise OSError(e.errno, f"cannot write {path.name} in {path.parent}: {e.strerror}") from e
            chunk = os.pread(src, min(_CHUNK, n - copied), src_off + copied)
            if not chunk:
                raise OSError(errno.EIO, f"unexpected end of {path.name} while rewriting it") from None
            _write_all(dst, memoryview(chunk), dst_off + copied, path)
            k = len(chunk)
        if k <= 0:
            raise OSError(errno.EIO, f"unexpected end of {path.name} while rewriting it")
        copied += k


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ShardWriter:
    """Write tensors as they come into size-bounded safetensors part files.

    Each tensor's bytes are written into the current part file as soon as it is added (no
    copy, no reference kept), behind space reserved for the header; when adding the next
    tensor would take the part over ``max_shard_bytes``, the part is *sealed*: its header is
    written into the reserve, and its sha256 is computed from the page cache in a
    background thread while the next part is being written.  A part is fsynced and
    ``os.replace``-d from a hidden temporary name to ``f"{prefix}-{k:05d}.safetensors"``
    (k from 1) once its hash is known (at the next seal, or at :meth:`close`), so a part
    file that exists is complete.  A tensor bigger than the limit gets a part of its own.

    Memory: the tensor being added, plus an 8 MiB read buffer per part being hashed.

    After :meth:`close` (which returns ``{tensor name: part filename}``), ``files`` lists the
    part filenames in order, ``num_tensors`` counts tensors, ``total_bytes`` sums their bytes
    and ``digests`` maps each part filename to ``{"bytes", "sha256"}`` of the whole file (what
    the export manifest records; see :func:`final_shard_names` for their published names).
    Usable as a context manager (closes on success, discards unfinished parts on error).

    Errors (a full disk, a read-only or vanished directory) name the file and directory;
    the temporary file of the failed part is removed before the error propagates.
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
        self.digests: dict[str, dict] = {}
        self._key_to_part: dict[str, str] = {}
        self._names: set[str] = set()
        self._part: Optional[_Part] = None  # being written
        self._sealed: Optional[_Part] = None  # hashed in the background, not yet committed
        self._reserve = _header_reserve(max_shard_bytes)
        self._closed = False

    @property
    def _buffer_bytes(self) -> int:
        """Tensor bytes in the part being written (always below the limit between calls)."""
        return self._part.data_bytes if self._part is not None else 0

    # -- public -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``name``; may seal the current part first to stay in bounds."""
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.directory}, prefix={self.prefix!r}) is closed; cannot add {name!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}: it was already added to this writer")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; move it to CPU before writing")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be written")
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        try:
            if self._part is not None and self._part.entries and self._part.data_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            if self._part is None:
                key = _layout_key(self.prefix, self.max_shard_bytes, name, _ST_DTYPES[tensor.dtype], tensor.shape)
                with _LAYOUTS_LOCK:
                    predicted = _LAYOUTS.get(key)
                self._part = _Part(self.directory, f"{self.prefix}-{len(self.files) + 1:05d}.safetensors", self._reserve, predicted)
            self._part.write(name, tensor)
        except BaseException:
            self._abort()
            raise
        self._names.add(name)
        self._key_to_part[name] = self._part.part
        self.total_bytes += nbytes
        self.num_tensors += 1
        if self._part.data_bytes >= self.max_shard_bytes:  # full (or one oversize tensor): seal now
            self._flush()

    def close(self) -> dict[str, str]:
        """Seal and commit what is left and return ``{tensor name: part filename}``.  Idempotent."""
        if not self._closed:
            try:
                if self._part is not None:
                    self._flush()
                self._commit_sealed()
                if self.files:
                    _fsync_path(self.directory, directory=True)
            except BaseException:
                self._abort()
                raise
            self._closed = True
        return dict(self._key_to_part)

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
    def _flush(self) -> None:
        """Seal the part being written (its hash runs in the background) and commit the
        previously sealed one."""
        part = self._part
        if part is None:
            return
        self._commit_sealed()
        part.seal()
        self._sealed, self._part = part, None
        self.files.append(part.part)
        if part.entries and not part.rewritten:
            first = part.entries[0]
            with _LAYOUTS_LOCK:
                _LAYOUTS[_layout_key(self.prefix, self.max_shard_bytes, first[0], first[1], first[2])] = part.layout()
                _LAYOUTS.move_to_end(_layout_key(self.prefix, self.max_shard_bytes, first[0], first[1], first[2]))
                while len(_LAYOUTS) > _LAYOUTS_MAX:
                    _LAYOUTS.popitem(last=False)

    def _commit_sealed(self) -> None:
        sealed = self._sealed
        if sealed is None:
            return
        digest = sealed.commit()
        self._sealed = None
        self.digests[sealed.part] = {"bytes": sealed.size, "sha256": digest}

    def _abort(self) -> None:
        for part in (self._part, self._sealed):
            if part is not None:
                part.discard()
        if self._sealed is not None and self._sealed.part in self.files:
            self.files.remove(self._sealed.part)
        self._part = self._sealed = None
        self._closed = True


def final_shard_names(parts) -> dict[str, str]:
    """``{part filename: published name}`` for the merged part files of every writer: parts
    are numbered in sorted order, ``model-{k:05d}-of-{n:05d}.safetensors``.  Use it to carry
    ``ShardWriter.digests`` over to the names :func:`finalize_shards` gives the files."""
    parts = sorted(set(parts))
    return {part: hf_shard_name(k, len(parts)) for k, part in enumerate(parts, start=1)}


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

    rename = final_shard_names(parts)
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
