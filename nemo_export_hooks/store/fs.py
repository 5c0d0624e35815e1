"""File-system helpers of the export directory: fsync, atomic writes, staging and
directory locks, the bounded readers (JSON, safetensors headers) and the digests of the
shards this process wrote.

Why here: the writer, the commit and the verifier all need them, and a reader of a
directory that may be hostile or half-written must be bounded the same way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

from .layout import trash_name

__all__ = [
    "PathLike",
    "fsync_file",
    "fsync_dir",
    "fsync_tree",
    "named",
    "atomic_write_text",
    "sha256_file",
    "remove_tree",
    "lock_staging",
    "release_staging",
    "prune_locks",
    "locked_here",
    "staging_in_use",
    "dir_lock",
    "BadJSON",
    "read_json",
    "read_safetensors_header",
    "remember_digest",
    "known_digest",
]

log = logging.getLogger("nemo_export_hooks.publish")

_CHUNK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


# -- fsync, atomic writes ------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames/creations in it are durable; some filesystems refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            p = Path(dirpath) / fn
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def named(e: OSError, what: str) -> OSError:
    """``e`` again, saying what was done to which file (a bare ENOSPC names no file)."""
    return type(e)(e.errno, f"{what}: {e.strerror or e}") if e.errno is not None else type(e)(f"{what}: {e}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise named(e, f"cannot write {path}") from e
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """Rename ``path`` to a hidden trash name, then delete it.

    Readers never see a half-deleted export under its real name, and a crash mid-delete
    leaves a trash directory that :func:`clean_stale_staging` recognises.
    """
    trash = path.parent / trash_name(path.name)
    os.rename(path, trash)
    shutil.rmtree(trash)


# -- staging locks ------------------------------------------------------------------------
# A staging directory is locked (``flock`` on the directory) by the process that created it
# until it is published or abandoned, so a cleanup by another run sharing the parent
# (:func:`clean_stale_staging`) never deletes an export that is still being written.  The
# kernel drops the lock when the process dies, however it dies: a crashed export's staging
# directory is unlocked and gets cleaned.  Where ``flock`` is unsupported (some network
# filesystems) nothing is locked and cleanup falls back to names (and ``min_age_s``).
_LOCKS: dict = {}  # str(staging path) -> fd holding the lock
_LOCKS_GUARD = threading.Lock()
O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def lock_staging(path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, O_DIR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    with _LOCKS_GUARD:
        _LOCKS[str(path)] = fd


def release_staging(path: PathLike) -> None:
    """Drop this process's lock on a staging directory (done by :func:`publish`; call it
    after removing a staging directory yourself, or let the next call prune it)."""
    with _LOCKS_GUARD:
        fd = _LOCKS.pop(str(path), None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def prune_locks() -> None:
    """Close the locks of staging directories that no longer exist (removed after a failure)."""
    with _LOCKS_GUARD:
        items = list(_LOCKS.items())
    for key, fd in items:
        try:
            gone = os.fstat(fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            release_staging(key)


def staging_in_use(path: PathLike) -> bool:
    """True if a live process holds the lock of staging directory ``path`` (this process's
    own locks count too, except for :func:`clean_stale_staging`, which treats a staging
    directory this process created as abandoned: exports run to completion or removal
    before the next cleanup of the same process)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = os.open(path, O_DIR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # locking unsupported here
        return False
    finally:
        os.close(fd)  # also releases the probe's own lock
    return False



def locked_here(path: PathLike) -> bool:
    """This process holds the lock of staging directory ``path`` (it created it)."""
    with _LOCKS_GUARD:
        return str(path) in _LOCKS


class dir_lock:
    """``flock`` on a directory for the duration of a block (no lock file is created);
    nothing is locked where the file system does not support it.  A lock another process
    holds is waited for, with a log line saying what for, at most ``timeout_s`` seconds
    (``None``: without bound); then ``TimeoutError`` names the directory."""

    def __init__(self, path: Path, timeout_s: Optional[float] = None, what: str = "", on_wait=None):
        self.path, self.fd = path, None
        self.timeout_s, self.what, self.on_wait = timeout_s, what, on_wait

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        try:
            self.fd = os.open(self.path, O_DIR)
        except OSError:
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            pass
        except OSError:  # locking unsupported here
            self._close()
            return self
        bound = "without a bound" if self.timeout_s is None else f"at most {self.timeout_s:g} s"
        log.info("waiting for the lock on %s %s: another process holds it (flock on the directory, taken to update latest); waiting %s", self.path, self.what, bound)
        if self.on_wait is not None:
            self.on_wait()
        t0 = time.monotonic()
        pause = 0.01
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError:
                self._close()
                return self
            waited = time.monotonic() - t0
            if self.timeout_s is not None and waited >= self.timeout_s:
                self._close()
                raise TimeoutError(
                    f"gave up waiting for the lock on {self.path} {self.what} after {waited:.1f} s: another process "
                    "holds it (flock on the directory, taken to update latest); latest was left as it was"
                )
            time.sleep(pause if self.timeout_s is None else min(pause, max(0.0, self.timeout_s - waited)))
            pause = min(pause * 2, 0.5)
        log.info("got the lock on %s after %.2f s", self.path, time.monotonic() - t0)
        return self

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
        self.fd = None

    def __exit__(self, *exc):
        self._close()
        return False



# -- bounded readers ----------------------------------------------------------------------
# Bounds for what verify reads, so that any input (a hostile or broken directory) costs
# bounded time and memory and ends in a one-line reason.
JSON_MAX_BYTES = 64 << 20  # tokenizer.json of a large vocabulary is tens of MB
CONFIG_MAX_BYTES = 4 << 20  # config.json, generation_config.json: a few KB in practice
JSON_MAX_DEPTH = 64
TREE_MAX_DEPTH = 16  # an export is flat (a tokenizer may add a level or two)
TREE_MAX_ENTRIES = 100_000


class BadJSON(ValueError):
    """A JSON file verify will not (or cannot) read: its message is the one-line reason."""


def json_depth(obj) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        depth = max(depth, d)
        if depth > JSON_MAX_DEPTH:
            return depth
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return depth


def read_json(fp: Path, max_bytes: int = JSON_MAX_BYTES):
    """Parse ``fp``: a regular file (never a FIFO or device: opened non-blocking and checked
    before reading) of at most ``max_bytes``, nested at most :data:`JSON_MAX_DEPTH` deep.
    Raises :class:`BadJSON` (or ``OSError``) with the reason."""
    import stat

    fd = os.open(fp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadJSON("is not a regular file")
        if st.st_size > max_bytes:
            raise BadJSON(f"is {st.st_size} bytes, more than the {max_bytes} bytes verify reads of it")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadJSON(f"grew beyond {max_bytes} bytes while read")
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadJSON(f"is not valid JSON: nested deeper than {JSON_MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadJSON(f"is not valid JSON: {e}") from None
    if json_depth(obj) > JSON_MAX_DEPTH:
        raise BadJSON(f"is nested deeper than {JSON_MAX_DEPTH} levels")
    return obj



SAFETENSORS_HEADER_MAX_BYTES = 100 * 2**20  # what the safetensors library itself accepts


def read_safetensors_header(path: PathLike) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), read
    without loading a tensor; at most :data:`SAFETENSORS_HEADER_MAX_BYTES`.  The one header
    reader of the package: the writer (``total_size``) and :mod:`.verify` use it."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > SAFETENSORS_HEADER_MAX_BYTES:
            raise ValueError(f"{path} has an implausible safetensors header length {n}")
        header = f.read(n)
        if len(header) != n:
            raise ValueError(f"{path} has a truncated safetensors header")
    try:
        return json.loads(header)
    except ValueError as e:
        raise ValueError(f"{path} has an unparseable safetensors header: {e}") from None


# Digests of the part files written by this process, by file identity.  write_manifest()
# looks them up (``known_digest``) so that rank 0 does not read back and hash, after the
# fact, the shards it has just written.  An entry is used only while the file still has the
# device, inode, size and mtime it had when its bytes were hashed.
_DIGESTS: "OrderedDict[tuple, str]" = OrderedDict()
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 1 << 16


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remember_digest(path: Path, sha256: str) -> None:
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
