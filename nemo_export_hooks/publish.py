"""Staging, atomic publish, manifest, verification, retention and the ``latest`` pointer.

Why: an export is written next to a live training checkpoint and may be read (by an eval
job, an uploader) at any moment.  A reader must never see a half-written export, a crash
must leave nothing that looks like an export, and housekeeping must never delete a
directory this library did not create.  So:

* every export is written into a hidden *staging* sibling of its final directory
  (:func:`make_staging_dir`), on the same filesystem so the final ``os.rename`` is atomic;
* :func:`write_manifest` records every file's size and sha256 plus who produced it; the
  manifest is also the proof of ownership that :func:`publish` (overwrite) and
  :func:`apply_retention` require before deleting anything;
* :func:`publish` fsyncs and renames staging -> final; :func:`clean_stale_staging` removes
  what a crash left behind, matching only our own hidden staging/trash names;
* :func:`verify_export` re-checks a published export against its manifest and index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = [
    "MANIFEST_NAME",
    "PRODUCER_NAME",
    "STAGING_MARKER",
    "TRASH_MARKER",
    "staging_name",
    "trash_name",
    "is_staging_name",
    "is_trash_name",
    "make_staging_dir",
    "release_staging",
    "staging_in_use",
    "clean_stale_staging",
    "write_manifest",
    "read_manifest",
    "is_our_export",
    "publish",
    "verify_export",
    "update_latest",
    "apply_retention",
    "deletable_export",
    "new_run_id",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "export_manifest.json"
PRODUCER_NAME = "nemo-export-hooks"
INDEX_NAME = "model.safetensors.index.json"
LATEST_LINK = "latest"
LATEST_TXT = "latest.txt"

STAGING_MARKER = ".staging-"
TRASH_MARKER = ".trash-"
_STAGING_RE = re.compile(r"^\.(?P<final>.+)" + re.escape(STAGING_MARKER) + r"[0-9a-f]{8}$")
_TRASH_RE = re.compile(r"^\.(?P<final>.+)" + re.escape(TRASH_MARKER) + r"[0-9a-f]{8}$")
_LATEST_TMP_RE = re.compile(r"^\.latest(\.txt)?\.tmp-[0-9a-f]{8}$")
_RESERVED_KEYS = ("files", "producer", "created_utc", "manifest_version", "manifest_sha256")
_CHUNK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


# -- naming -------------------------------------------------------------------------------
def staging_name(final_name: str) -> str:
    """Hidden staging name for an export called ``final_name``: ``.{name}.staging-{8 hex}``."""
    return f".{final_name}{STAGING_MARKER}{uuid.uuid4().hex[:8]}"


def trash_name(final_name: str) -> str:
    """Hidden name an export is renamed to just before it is deleted: ``.{name}.trash-{8 hex}``."""
    return f".{final_name}{TRASH_MARKER}{uuid.uuid4().hex[:8]}"


def is_staging_name(name: str) -> bool:
    return bool(_STAGING_RE.match(name))


def is_trash_name(name: str) -> bool:
    return bool(_TRASH_RE.match(name))


# -- small fs helpers ---------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
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


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            p = Path(dirpath) / fn
            if not p.is_symlink():
                _fsync_file(p)
        _fsync_dir(Path(dirpath))


def _named(e: OSError, what: str) -> OSError:
    """``e`` again, saying what was done to which file (a bare ENOSPC names no file)."""
    return type(e)(e.errno, f"{what}: {e.strerror or e}") if e.errno is not None else type(e)(f"{what}: {e}")


def _atomic_write_text(path: Path, text: str) -> None:
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
            raise _named(e, f"cannot write {path}") from e
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _producer_version() -> str:
    try:
        from importlib.metadata import version

        return version(PRODUCER_NAME)
    except Exception:
        return "0+unknown"


def _remove_tree(path: Path) -> None:
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
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _lock_staging(path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, _O_DIR)
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


def _prune_locks() -> None:
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
        fd = os.open(path, _O_DIR)
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


# -- staging ------------------------------------------------------------------------------
def make_staging_dir(final_dir: PathLike, create_parent: bool = True) -> Path:
    """Create and return a fresh hidden staging directory next to ``final_dir``.

    It is a sibling (``final_dir.parent / ".{name}.staging-{8 hex}"``) so the final rename
    stays on one filesystem and is atomic.  The parent is created if needed, unless
    ``create_parent=False`` (an export inside a training checkpoint: a checkpoint directory
    the checkpoint manager just deleted must not come back holding only the export; the
    ``mkdir`` of the staging directory then fails atomically if the parent is gone).  The directory
    is locked by this process until :func:`publish` (or :func:`release_staging`), so that
    :func:`clean_stale_staging` in another run leaves it alone while it is being written.
    """
    final_dir = Path(final_dir)
    if not final_dir.name or final_dir.name in (".", ".."):
        raise ValueError(f"invalid export directory {str(final_dir)!r}: it needs a final name component")
    parent = final_dir.parent
    if create_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise type(e)(e.errno, f"cannot create export parent directory {parent}: {e.strerror}") from e
    elif not os.path.isdir(parent):
        raise FileNotFoundError(
            f"export parent directory {parent} does not exist (a checkpoint directory deleted by its rotation?); "
            "an export inside a checkpoint never creates it"
        )
    if not parent.is_dir():
        raise NotADirectoryError(f"export parent {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create a staging directory in {parent}: it is not writable")
    staging = parent / staging_name(final_dir.name)
    try:
        staging.mkdir()
    except FileNotFoundError as e:
        raise FileNotFoundError(e.errno, f"cannot create staging directory {staging}: its parent {parent} is gone") from e
    except OSError as e:
        raise type(e)(e.errno, f"cannot create staging directory {staging}: {e.strerror}") from e
    _prune_locks()
    _lock_staging(staging)
    return staging


def clean_stale_staging(parent: PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete what crashed exports left in ``parent``: staging and trash directories, and
    the temporary files of an interrupted ``latest`` update.

    Only entries whose names match our hidden patterns (``.{name}.staging-{8 hex}``,
    ``.{name}.trash-{8 hex}`` directories; ``.latest.tmp-{8 hex}`` / ``.latest.txt.tmp-{8
    hex}`` links and files) are removed; anything else is left alone.  A staging directory
    locked by a live export of another process (another run sharing ``parent``, see
    :func:`make_staging_dir`) is skipped; ``min_age_s`` also skips directories modified more
    recently than that (for filesystems without ``flock``).  Returns the removed paths.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    _prune_locks()
    now = time.time()
    removed = []
    for entry in sorted(parent.iterdir()):
        if _LATEST_TMP_RE.match(entry.name) and (entry.is_symlink() or entry.is_file()):
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            removed.append(entry)
            continue
        if not (is_staging_name(entry.name) or is_trash_name(entry.name)):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if min_age_s > 0 and now - entry.stat().st_mtime < min_age_s:
            continue
        if is_staging_name(entry.name):
            if str(entry) in _LOCKS:  # our own, abandoned: this process is not writing it now
                release_staging(entry)
            elif staging_in_use(entry):
                log.info("not removing staging directory %s: an export in another process holds it", entry)
                continue
        try:
            shutil.rmtree(entry)
        except FileNotFoundError:
            continue
        log.info("removed stale export staging directory %s", entry)
        removed.append(entry)
    return removed


# -- manifest -----------------------------------------------------------------------------
def write_manifest(directory: PathLike, meta: dict, known: Optional[dict] = None) -> dict:
    """Write ``export_manifest.json`` into ``directory`` and return it.

    It holds ``meta`` plus ``files`` (``{relative posix path: {"bytes", "sha256"}}`` for every
    file but the manifest), ``producer`` (name, package version), ``created_utc``,
    ``manifest_version`` and ``manifest_sha256`` (of the manifest itself, see
    :func:`verify_export`).  Write it last, after every other file is in place.

    Shards are not read back when their digest is already known: ``known`` maps relative
    paths to ``{"bytes", "sha256"}`` computed while they were written (other ranks'
    ``ShardWriter.digests``, renamed with ``final_shard_names``), and files a
    ``ShardWriter`` of this process wrote and nobody changed since are looked up by file
    identity.  An entry whose size differs from the file's is ignored (the file is hashed).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot write a manifest: {directory} is not a directory")
    if not isinstance(meta, dict):
        raise ValueError(f"manifest meta must be a dict, got {type(meta).__name__}")
    clash = [k for k in meta if k in _RESERVED_KEYS]
    if clash:
        raise ValueError(f"manifest meta uses reserved key(s) {clash}; these are filled in by write_manifest")
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"manifest meta key {k!r} is not JSON-serialisable: {e}") from None

    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        rel = p.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        size = p.stat().st_size
        digest = None
        hint = (known or {}).get(rel)
        if isinstance(hint, dict) and hint.get("bytes") == size and isinstance(hint.get("sha256"), str):
            digest = hint["sha256"]
        elif rel.endswith(".safetensors"):
            digest = _writer_digest(p)
        files[rel] = {"bytes": size, "sha256": digest or _sha256(p)}

    manifest = dict(meta)
    manifest.update(
        {
            "manifest_version": 1,
            "producer": {"name": PRODUCER_NAME, "version": _producer_version()},
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": files,
        }
    )
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    _atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: a changed byte in the
    manifest itself (a step, a producer) is caught too, not only changes to the files."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode("utf-8")).hexdigest()


def _writer_digest(path: Path) -> Optional[str]:
    try:
        from .exporter.writer import known_digest
    except Exception:  # pragma: no cover - torch missing: nothing was written by a ShardWriter
        return None
    return known_digest(path)


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The parsed manifest of ``directory``, or ``None`` if absent or unreadable."""
    try:
        data = _read_json(Path(directory) / MANIFEST_NAME)  # a bounded regular file, never a FIFO
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_our_export(directory: PathLike) -> bool:
    """True if ``directory`` is a real directory holding a manifest written by this library."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return False
    m = read_manifest(directory)
    producer = m.get("producer") if m else None
    return isinstance(producer, dict) and producer.get("name") == PRODUCER_NAME


# -- publish ------------------------------------------------------------------------------
def publish(staging: PathLike, final_dir: PathLike, overwrite: bool = False) -> Path:
    """fsync ``staging`` and atomically rename it to ``final_dir``; return ``final_dir``.

    If ``final_dir`` exists: without ``overwrite`` raise ``FileExistsError``; with it, replace
    it only if it is an export of ours (a manifest with our producer name), else raise.  The
    old export is first renamed aside to a hidden trash name, the new one renamed into place,
    then the old one deleted, so a reader sees either the old or the new export, never a
    mixture (at most, for an instant, no directory).  If the second rename fails the old
    export is put back.
    """
    staging, final_dir = Path(staging), Path(final_dir)
    if staging.is_symlink() or not staging.is_dir():
        raise NotADirectoryError(f"staging directory {staging} does not exist or is not a directory")
    parent = final_dir.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"parent of export directory {final_dir} does not exist")
    if staging.resolve() == final_dir.resolve():
        raise ValueError(f"staging directory and final directory are the same: {final_dir}")
    if staging.stat().st_dev != parent.stat().st_dev:
        raise OSError(
            f"staging directory {staging} and export directory {final_dir} are on different filesystems; "
            "the rename would not be atomic (use make_staging_dir)"
        )

    if final_dir.is_symlink():
        raise FileExistsError(
            f"export directory {final_dir} is a symlink (to {os.readlink(final_dir)}); the rename would replace "
            "the link, not write where it points: remove it or publish to the real directory"
        )
    replacing = os.path.lexists(final_dir)
    if replacing:
        if not overwrite:
            raise FileExistsError(f"export directory {final_dir} already exists (pass overwrite=True to replace an export)")
        if not is_our_export(final_dir):
            raise FileExistsError(
                f"refusing to overwrite {final_dir}: it is not an export written by {PRODUCER_NAME} "
                f"(no {MANIFEST_NAME} with our producer name)"
            )

    try:
        _fsync_tree(staging)
    except OSError as e:
        raise _named(e, f"cannot fsync {e.filename or staging}") from e
    _fsync_dir(staging.parent)

    old_trash: Optional[Path] = None
    if replacing:
        old_trash = parent / trash_name(final_dir.name)
        try:
            os.rename(final_dir, old_trash)
        except OSError as e:
            raise _named(e, f"cannot move the old export {final_dir} aside to {old_trash.name}") from e
    try:
        os.rename(staging, final_dir)
    except BaseException as e:
        if old_trash is not None:
            os.rename(old_trash, final_dir)
        if isinstance(e, OSError):
            raise _named(e, f"cannot rename {staging} to {final_dir}") from e
        raise
    release_staging(staging)
    _fsync_dir(parent)
    if old_trash is not None:
        try:
            shutil.rmtree(old_trash)
        except OSError as e:  # the new export is in place; a leftover is cleaned next run
            log.warning("published %s but could not delete the old export %s: %s", final_dir, old_trash, e)
    return final_dir


# -- verify -------------------------------------------------------------------------------
# Bounds for what verify reads, so that any input (a hostile or broken directory) costs
# bounded time and memory and ends in a one-line reason.
JSON_MAX_BYTES = 64 << 20  # tokenizer.json of a large vocabulary is tens of MB
CONFIG_MAX_BYTES = 4 << 20  # config.json, generation_config.json: a few KB in practice
JSON_MAX_DEPTH = 64
TREE_MAX_DEPTH = 16  # an export is flat (a tokenizer may add a level or two)
TREE_MAX_ENTRIES = 100_000


class _BadJSON(ValueError):
    """A JSON file verify will not (or cannot) read: its message is the one-line reason."""


def _json_depth(obj) -> int:
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


def _read_json(fp: Path, max_bytes: int = JSON_MAX_BYTES):
    """Parse ``fp``: a regular file (never a FIFO or device: opened non-blocking and checked
    before reading) of at most ``max_bytes``, nested at most :data:`JSON_MAX_DEPTH` deep.
    Raises :class:`_BadJSON` (or ``OSError``) with the reason."""
    import stat

    fd = os.open(fp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _BadJSON("is not a regular file")
        if st.st_size > max_bytes:
            raise _BadJSON(f"is {st.st_size} bytes, more than the {max_bytes} bytes verify reads of it")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _BadJSON(f"grew beyond {max_bytes} bytes while read")
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise _BadJSON(f"is not valid JSON: nested deeper than {JSON_MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadJSON(f"is not valid JSON: {e}") from None
    if _json_depth(obj) > JSON_MAX_DEPTH:
        raise _BadJSON(f"is nested deeper than {JSON_MAX_DEPTH} levels")
    return obj


def _tree(path: Path) -> tuple[list[Path], Optional[str]]:
    """Every entry under ``path`` (sorted; symlinks listed, not followed), walked without
    recursion, and why the walk stopped early (too deep, too many entries), or ``None``."""
    out: list[Path] = []
    stack = [(path, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            return sorted(out), f"{d.relative_to(path).as_posix() or '.'} cannot be listed: {e.strerror or e}"
        for e in entries:
            p = Path(e.path)
            out.append(p)
            if len(out) > TREE_MAX_ENTRIES:
                return sorted(out), f"it holds more than {TREE_MAX_ENTRIES} entries"
            if e.is_dir(follow_symlinks=False):
                if depth + 1 >= TREE_MAX_DEPTH:
                    return sorted(out), f"{p.relative_to(path).as_posix()}/: directories nested deeper than {TREE_MAX_DEPTH} levels"
                stack.append((p, depth + 1))
    return sorted(out), None


def verify_export(path: PathLike, load_config: bool = True) -> list[str]:
    """Check an export; return human-readable problems (an empty list means it is good).

    Checks: the manifest exists and parses; every listed file exists with the recorded size
    and sha256; no file (but hidden ones) is missing from the manifest; the index is
    complete: every file it names exists and holds every key it maps there, every tensor of
    every shard is in the index (under that shard), ``total_size`` is the shards' tensor
    bytes, and the manifest's ``num_tensors`` / ``total_bytes`` agree with it; every JSON file
    parses and ``config.json`` is an object.  By default (``load_config=True``, what the CLI
    ``nemo-export-hooks verify`` does) it also loads the config with
    ``transformers.AutoConfig`` (offline), as a reader would, and builds the model class on
    the meta device to compare every tensor's name and shape with the shards (and refuses
    values of the wrong type or out of range), so that an export that passes loads: a
    ``config.json`` that contradicts its tensors is a problem here too.  ``load_config=False``
    (the CLI's ``--no-load-config``) checks files and index only, without transformers.
    No file may be a symlink.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems: list[str] = []
    tree, too_big = _tree(path)
    if too_big is not None:
        return [f"{path} is not an export: {too_big}"]
    # An export holds only regular files and directories: a symlink (a shard replaced by a
    # link to a file elsewhere) is content the manifest does not vouch for, and would change
    # when its target does.  (``path`` itself may be a link, e.g. ``latest``.)  A FIFO, a
    # socket or a device is never read.
    import stat

    for p in tree:
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            problems.append(f"{rel}: is a symlink (to {os.readlink(p)}); an export holds only regular files")
            continue
        try:
            mode = p.lstat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            problems.append(f"{rel}: is not a regular file; an export holds only regular files")

    manifest = None
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        problems.append(f"{MANIFEST_NAME} is missing")
    else:
        try:
            manifest = _read_json(mpath)
        except _BadJSON as e:
            problems.append(f"{MANIFEST_NAME} {e}")
        except OSError as e:
            problems.append(f"{MANIFEST_NAME} cannot be read: {e}")
        if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
            problems.append(f"{MANIFEST_NAME} has no 'files' table")
            manifest = None
        if manifest is not None and "manifest_sha256" in manifest and manifest["manifest_sha256"] != _manifest_digest(manifest):
            problems.append(f"{MANIFEST_NAME} was modified after it was written (its manifest_sha256 does not match)")

    listed: dict = manifest["files"] if manifest else {}
    for rel, info in sorted(listed.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: manifest entry points outside the export")
            continue
        fp = path / rel
        if fp.is_symlink():
            continue  # reported above
        if not fp.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        if not isinstance(info, dict):
            problems.append(f"{rel}: malformed manifest entry {info!r}")
            continue
        size = fp.stat().st_size
        if size != info.get("bytes"):
            problems.append(f"{rel}: size is {size} bytes, manifest says {info.get('bytes')}")
            continue
        digest = _sha256(fp)
        if digest != info.get("sha256"):
            problems.append(f"{rel}: sha256 is {digest}, manifest says {info.get('sha256')}")
    if manifest is not None:
        for p in tree:
            rel = p.relative_to(path).as_posix()
            if rel in listed or rel == MANIFEST_NAME or p.is_dir() or any(s.startswith(".") for s in Path(rel).parts):
                continue
            kind = "safetensors file" if p.name.endswith(".safetensors") else "file"
            problems.append(f"{rel}: {kind} not listed in the manifest")

    index_problems, counts = _check_index(path)
    problems.extend(index_problems)
    if manifest is not None and counts is not None:
        n_tensors, total = counts
        if isinstance(manifest.get("num_tensors"), int) and manifest["num_tensors"] != n_tensors:
            problems.append(f"{MANIFEST_NAME} says {manifest['num_tensors']} tensors, the shards hold {n_tensors}")
        if isinstance(manifest.get("total_bytes"), int) and manifest["total_bytes"] != total:
            problems.append(f"{MANIFEST_NAME} says {manifest['total_bytes']} tensor bytes, the shards hold {total}")

    for p in tree:
        if p.parent != path or not p.name.endswith(".json") or p.name in (MANIFEST_NAME, INDEX_NAME, "config.json"):
            continue
        if p.is_symlink():
            continue  # reported above
        try:
            _read_json(p, CONFIG_MAX_BYTES if p.name == "generation_config.json" else JSON_MAX_BYTES)
        except _BadJSON as e:
            problems.append(f"{p.name} {e}")
        except OSError as e:
            problems.append(f"{p.name} cannot be read: {e}")
    cpath = path / "config.json"
    if not os.path.lexists(cpath):
        problems.append("config.json is missing")
    elif not cpath.is_symlink():
        cfg = None
        try:
            cfg = _read_json(cpath, CONFIG_MAX_BYTES)
        except _BadJSON as e:
            problems.append(f"config.json {e}")
        except OSError as e:
            problems.append(f"config.json cannot be read: {e}")
        if cfg is not None and not isinstance(cfg, dict):
            problems.append("config.json is not a JSON object")
        elif cfg is not None and load_config:
            loaded = _load_config(path)
            problems.extend(loaded)
            if not loaded:
                problems.extend(_check_against_config(path, cfg))
    return problems


def _load_config(path: Path) -> list[str]:
    try:
        from transformers import AutoConfig
    except ImportError:
        return ['config.json cannot be loaded: transformers is not installed (pip install "nemo-export-hooks[hf]", or use --no-load-config)']
    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        return [f"config.json does not load in transformers: {type(e).__name__}: {e}"]
    return []


def _shard_entries(fp: Path) -> dict:
    """The tensors of a safetensors file, ``{name: (dtype, shape, bytes)}``, after the
    library validated it (offsets inside the file, no gaps or overlaps)."""
    from safetensors import safe_open

    with safe_open(str(fp), framework="pt") as f:  # reads and validates the header only
        keys = set(f.keys())
    import struct

    with open(fp, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k in keys}


def _shard_header(fp: Path) -> dict:
    """The tensors of a safetensors file, ``{name: bytes}`` (see :func:`_shard_entries`)."""
    return {k: e[2] for k, e in _shard_entries(fp).items()}


_QUANT_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")


def _check_against_config(path: Path, cfg: dict) -> list[str]:
    """Names and shapes of the shards against the HF class built from ``config.json`` on
    the meta device, plus values transformers accepts but no model can have (wrong types,
    out of range).  Why: ``from_pretrained`` refuses a size mismatch, but leaves missing
    weights random without raising, and a bad value fails only in the forward pass.  A
    checkpoint that passes loads.  Nothing is checked when transformers is not installed."""
    try:
        import transformers  # noqa: F401

        from .exporter.hf_config import config_problems, expected_hf_shapes
    except ImportError:
        return []
    try:
        problems = config_problems(cfg)
    except Exception as e:  # a value transformers' own config class chokes on
        return [f"config.json cannot be checked: {type(e).__name__}: {e}"]
    have: dict = {}
    files = [path / "model.safetensors"] if not (path / INDEX_NAME).is_file() else sorted(path.glob("*.safetensors"))
    for fp in files:
        if fp.is_symlink() or not fp.is_file():
            return problems  # reported above
        try:
            have.update(_shard_entries(fp))
        except Exception:
            return problems  # reported by the index check
    claimed = _claimed_counts_problems(cfg, have)
    if claimed:  # building the class from these counts could take minutes and gigabytes
        return problems + claimed
    try:
        expected = expected_hf_shapes(cfg)
    except Exception as e:
        return problems + [f"config.json does not build a transformers model: {type(e).__name__}: {e}"]
    if expected is None:
        return problems
    cls = cfg["architectures"][0]
    base = {n: e for n, e in have.items() if not n.endswith(_QUANT_SUFFIXES)}
    missing = sorted(set(expected) - set(base))
    unexpected = sorted(set(base) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) {cls} needs are in no shard (transformers would leave them random): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the shards are not in {cls} built from config.json: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = []
    for n in sorted(set(base) & set(expected)):
        dtype, shape, _ = base[n]
        logical = (shape[0], shape[1] * 2) if dtype == "U8" and len(shape) == 2 else shape  # NVFP4: two values a byte
        if expected[n] is not None and tuple(logical) != tuple(expected[n]):
            wrong.append(f"{n} is {list(logical)}, config.json gives {list(expected[n])}")
    if wrong:
        problems.append(f"{len(wrong)} tensor shape(s) do not match {cls} built from config.json: " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
    return problems


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _claimed_counts_problems(cfg: dict, have: dict) -> list[str]:
    """config.json's layer and expert counts against the shard headers, before the model
    class is built from them: a count above what the shards hold would build a huge class
    (``num_hidden_layers: 100000``: minutes, gigabytes) only to report the tensors missing."""
    out = []
    layers = {int(m.group(1)) for n in have for m in [_LAYER_RE.search(n)] if m}
    experts = {int(m.group(1)) for n in have for m in [_EXPERT_RE.search(n)] if m}
    for keys, found, what in ((_LAYER_COUNTS, layers, "layer"), (_EXPERT_COUNTS, experts, "expert")):
        for k in keys:
            v = cfg.get(k)
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if what == "expert" and not found:
                continue  # experts stored fused (one tensor for all): their shapes are checked
            n = max(found) + 1 if found else 0
            if v > n:
                from .exporter.hf_config import short_repr

                out.append(
                    f"config.json says {k}={short_repr(v)}, the shards hold {n} {what}(s)"
                    + (f" ({what} indices 0..{n - 1})" if n else "")
                    + f": transformers would leave the other {what}s random (the model class was not built from it)"
                )
    return out


def _shard_keys(fp: Path) -> set:
    return set(_shard_header(fp))


def _check_index(path: Path) -> tuple[list[str], Optional[tuple[int, int]]]:
    """Problems of the weights, and (tensors, tensor bytes) when they could be counted."""
    problems: list[str] = []
    ipath = path / INDEX_NAME
    if not ipath.is_file():
        if (path / "model.safetensors").is_file():
            try:
                tensors = _shard_header(path / "model.safetensors")
                return problems, (len(tensors), sum(tensors.values()))
            except Exception as e:
                problems.append(f"model.safetensors cannot be opened: {e}")
        else:
            problems.append(f"no weights: neither {INDEX_NAME} nor model.safetensors exists")
        return problems, None
    try:
        index = _read_json(ipath)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("'weight_map' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{INDEX_NAME} is not a valid index: {type(e).__name__}: {e}"], None
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(str(fname), []).append(key)
    n_tensors, total, complete = 0, 0, True
    for fname, keys in sorted(by_file.items()):
        fp = path / fname
        if Path(fname).name != fname or not fp.is_file():
            problems.append(f"{INDEX_NAME} maps {len(keys)} tensor(s) to {fname}, which does not exist")
            complete = False
            continue
        try:
            have = _shard_header(fp)
        except Exception as e:
            problems.append(f"{fname} cannot be opened as safetensors: {e}")
            complete = False
            continue
        n_tensors += len(have)
        total += sum(have.values())
        missing = sorted(set(keys) - set(have))
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"{fname} lacks {len(missing)} key(s) the index maps to it: {missing[:5]}{more}")
        unindexed = sorted(k for k in have if weight_map.get(k) != fname)
        if unindexed:
            more = f" (+{len(unindexed) - 5} more)" if len(unindexed) > 5 else ""
            problems.append(f"{fname} holds {len(unindexed)} tensor(s) the index does not map to it: {unindexed[:5]}{more}")
    for p in sorted(path.glob("*.safetensors")):
        if p.name not in by_file:
            problems.append(f"{p.name}: safetensors file not referenced by {INDEX_NAME}")
    if not complete:
        return problems, None
    declared = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if declared is not None and declared != total:
        problems.append(f"{INDEX_NAME} says total_size {declared}, the shards hold {total} tensor bytes")
    return problems, (n_tensors, total)


# -- latest pointer and retention ---------------------------------------------------------
LATEST_LOCK_TIMEOUT_S = 60.0  # the longest update_latest waits for another process's lock


def update_latest(parent: PathLike, final_dir: PathLike, lock_timeout_s: Optional[float] = None, on_wait=None) -> bool:
    """Point ``parent/latest`` (relative symlink) and ``parent/latest.txt`` at ``final_dir``,
    unless they already point at an export of a later step; return whether they moved.

    ``latest`` means the export of the highest step in ``parent`` (steps from the
    manifests): two runs sharing a directory would otherwise fight over it, the last to
    publish winning even with an older step.  An export without a step, or a pointer whose
    target is gone or has no step, is replaced as before.  Updates are serialised across
    processes by an ``flock`` on ``parent`` (where supported): a wait for another process's
    lock is logged, ``on_wait()`` is called when it starts, and it ends after
    ``lock_timeout_s`` (default :data:`LATEST_LOCK_TIMEOUT_S`) with ``TimeoutError`` naming
    the directory; the pointers are then left as they are.  Both files are replaced
    atomically (temporary + ``os.replace``), so readers see the old or the new target.
    ``latest.txt`` (the name plus a newline) serves filesystems without symlinks; if
    symlinks are unsupported only the text file is written.
    """
    parent, final_dir = Path(parent), Path(final_dir)
    if final_dir.parent.resolve() != parent.resolve():
        raise ValueError(f"latest pointer in {parent} can only point at a directory in it, got {final_dir}")
    if not final_dir.is_dir():
        raise FileNotFoundError(f"cannot point latest at {final_dir}: it is not a directory")
    link = parent / LATEST_LINK
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; refusing to replace it")
    timeout = LATEST_LOCK_TIMEOUT_S if lock_timeout_s is None else float(lock_timeout_s)
    with _dir_lock(parent, timeout, f"to point latest at {final_dir.name}", on_wait):
        current = _latest_target(parent)
        new_step, cur_step = _manifest_step(final_dir), _manifest_step(current) if current is not None else None
        if current is not None and current.name != final_dir.name and new_step is not None and cur_step is not None and cur_step > new_step:
            log.info("latest in %s stays at %s (step %d): %s is step %d", parent, current.name, cur_step, final_dir.name, new_step)
            return False
        tmp = parent / f".{LATEST_LINK}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.symlink(final_dir.name, tmp, target_is_directory=True)
        except (OSError, NotImplementedError) as e:
            log.info("symlinks unavailable in %s (%s); writing only %s", parent, e, LATEST_TXT)
        else:
            try:
                os.replace(tmp, link)
            except BaseException as e:
                os.unlink(tmp)
                if isinstance(e, OSError):
                    raise _named(e, f"cannot replace {link}") from e
                raise
        _atomic_write_text(parent / LATEST_TXT, final_dir.name + "\n")
        _fsync_dir(parent)
    return True


def _latest_target(parent: Path) -> Optional[Path]:
    """The directory ``latest`` (or, without it, ``latest.txt``) names, if it exists."""
    name = None
    link = parent / LATEST_LINK
    if link.is_symlink():
        name = os.readlink(link)
    elif (parent / LATEST_TXT).is_file():
        try:
            name = (parent / LATEST_TXT).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    if not name or Path(name).name != name:
        return None
    target = parent / name
    return target if target.is_dir() else None


def _manifest_step(directory: Path) -> Optional[int]:
    m = read_manifest(directory) if is_our_export(directory) else None
    step = m.get("step") if m else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class _dir_lock:
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
            self.fd = os.open(self.path, _O_DIR)
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


def new_run_id() -> str:
    """A fresh run identity for ``manifest_extra={"run_id": ...}`` (see :func:`apply_retention`)."""
    return uuid.uuid4().hex


def deletable_export(directory: PathLike, expect: Optional[dict] = None) -> Optional[str]:
    """Why ``directory`` must not be deleted as an export of ours, or ``None`` if it may.

    It may only when it is a real directory (no symlink) whose manifest has our producer
    name, is unmodified (``manifest_sha256``), carries every field of ``expect`` with that
    value (``{"run_id": ..., "step": ...}``: this run's export of that step), and whose
    contents are exactly the manifest's files, with their sizes: nothing else, not even an
    empty directory or a hidden file.  A user's copy of an export with a notes file added,
    or another run's export moved under the name, is left alone."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return "it is not a directory"
    m = read_manifest(directory)
    if not is_our_export(directory) or not isinstance(m.get("files"), dict):
        return f"it has no {MANIFEST_NAME} written by {PRODUCER_NAME}"
    if "manifest_sha256" in m and m["manifest_sha256"] != _manifest_digest(m):
        return f"its {MANIFEST_NAME} was modified"
    for k, v in (expect or {}).items():
        if m.get(k) != v:
            return f"its manifest says {k}={m.get(k)!r}, this run's export has {k}={v!r}"
    listed = m["files"]
    dirs = {p.as_posix() for rel in listed for p in Path(rel).parents if p.as_posix() != "."}
    for root, dirnames, filenames in os.walk(directory):
        for n in dirnames + filenames:
            p = Path(root) / n
            rel = p.relative_to(directory).as_posix()
            if p.is_symlink():
                return f"{rel} is a symlink"
            if n in dirnames:
                if rel not in dirs:
                    return f"it holds {rel}/, which is not in its manifest"
            elif rel == MANIFEST_NAME:
                continue
            elif rel not in listed:
                return f"it holds {rel}, which is not in its manifest"
            elif not isinstance(listed[rel], dict) or p.stat().st_size != listed[rel].get("bytes"):
                return f"{rel} does not have the size its manifest records"
    for rel in listed:
        if not (directory / rel).is_file():
            return f"{rel} (in its manifest) is missing"
    return None


def apply_retention(
    owned: Iterable[PathLike],
    keep_last_k: Optional[int],
    *,
    run_id: Optional[str] = None,
    expect: Optional[dict] = None,
) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` complete exports of ``owned`` (exports this
    process made).

    ``owned`` is oldest first.  ``keep_last_k`` of ``None`` or <= 0 keeps everything.  Only
    what :func:`deletable_export` accepts counts as an export of ours: a real directory with
    our unmodified manifest whose contents are exactly the manifest's files, and, when
    given, whose manifest says ``run_id`` (this run) and the fields of ``expect[str(path)]``
    (e.g. ``{"step": 3}``: the export this run made there).  Only those count towards the
    ``keep_last_k`` kept, so the newest complete export is never deleted, even if a newer
    entry of ``owned`` has vanished or been replaced; anything else (a user's copy put under
    the name, with a notes file of theirs) is never deleted.  Returns the removed paths.
    """
    seen: dict = {}
    for p in owned:  # a path listed twice counts once, at its newest position
        seen.pop(str(p), None)
        seen[str(p)] = Path(p)
    owned = list(seen.values())
    if keep_last_k is None or keep_last_k <= 0 or len(owned) <= keep_last_k:
        return []
    older = {str(p) for p in owned[:-keep_last_k]}
    ours = []
    for p in owned:
        if not os.path.lexists(p):
            continue
        want = dict((expect or {}).get(str(p)) or {})
        if run_id is not None:
            want["run_id"] = run_id
        why = deletable_export(p, want)
        if why is not None:
            if str(p) in older:
                log.warning("retention: not deleting %s: %s", p, why)
            continue
        ours.append(p)
    removed = []
    for p in ours[:-keep_last_k]:
        try:
            _remove_tree(p)
        except OSError as e:
            log.warning("retention: could not delete %s: %s", p, e)
            continue
        removed.append(p)
    return removed
