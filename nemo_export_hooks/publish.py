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
    "clean_stale_staging",
    "write_manifest",
    "read_manifest",
    "is_our_export",
    "publish",
    "verify_export",
    "update_latest",
    "apply_retention",
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
_RESERVED_KEYS = ("files", "producer", "created_utc", "manifest_version")
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
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


# -- staging ------------------------------------------------------------------------------
def make_staging_dir(final_dir: PathLike) -> Path:
    """Create and return a fresh hidden staging directory next to ``final_dir``.

    It is a sibling (``final_dir.parent / ".{name}.staging-{8 hex}"``) so the final rename
    stays on one filesystem and is atomic.  The parent is created if needed.
    """
    final_dir = Path(final_dir)
    if not final_dir.name or final_dir.name in (".", ".."):
        raise ValueError(f"invalid export directory {str(final_dir)!r}: it needs a final name component")
    parent = final_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create export parent directory {parent}: {e.strerror}") from e
    if not parent.is_dir():
        raise NotADirectoryError(f"export parent {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create a staging directory in {parent}: it is not writable")
    staging = parent / staging_name(final_dir.name)
    try:
        staging.mkdir()
    except OSError as e:
        raise type(e)(e.errno, f"cannot create staging directory {staging}: {e.strerror}") from e
    return staging


def clean_stale_staging(parent: PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete staging (and trash) directories left in ``parent`` by crashed exports.

    Only real directories whose names match our hidden patterns (``.{name}.staging-{8 hex}``,
    ``.{name}.trash-{8 hex}``) are removed; anything else, symlinks included, is left alone.
    ``min_age_s`` skips directories modified more recently than that, so a cleanup at start
    cannot race an export still being written by another process into the same parent.
    Returns the removed paths.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in sorted(parent.iterdir()):
        if not (is_staging_name(entry.name) or is_trash_name(entry.name)):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if min_age_s > 0 and now - entry.stat().st_mtime < min_age_s:
            continue
        try:
            shutil.rmtree(entry)
        except FileNotFoundError:
            continue
        log.info("removed stale export staging directory %s", entry)
        removed.append(entry)
    return removed


# -- manifest -----------------------------------------------------------------------------
def write_manifest(directory: PathLike, meta: dict) -> dict:
    """Write ``export_manifest.json`` into ``directory`` and return it.

    It holds ``meta`` plus ``files`` (``{relative posix path: {"bytes", "sha256"}}`` for every
    file but the manifest), ``producer`` (name, package version), ``created_utc`` and
    ``manifest_version``.  Write it last, after every other file is in place.
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
        files[rel] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}

    manifest = dict(meta)
    manifest.update(
        {
            "manifest_version": 1,
            "producer": {"name": PRODUCER_NAME, "version": _producer_version()},
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": files,
        }
    )
    _atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The parsed manifest of ``directory``, or ``None`` if absent or unreadable."""
    try:
        with open(Path(directory) / MANIFEST_NAME, encoding="utf-8") as f:
            data = json.load(f)
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

    replacing = os.path.lexists(final_dir)
    if replacing:
        if not overwrite:
            raise FileExistsError(f"export directory {final_dir} already exists (pass overwrite=True to replace an export)")
        if not is_our_export(final_dir):
            raise FileExistsError(
                f"refusing to overwrite {final_dir}: it is not an export written by {PRODUCER_NAME} "
                f"(no {MANIFEST_NAME} with our producer name)"
            )

    _fsync_tree(staging)
    _fsync_dir(staging.parent)

    old_trash: Optional[Path] = None
    if replacing:
        old_trash = parent / trash_name(final_dir.name)
        os.rename(final_dir, old_trash)
    try:
        os.rename(staging, final_dir)
    except BaseException:
        if old_trash is not None:
            os.rename(old_trash, final_dir)
        raise
    _fsync_dir(parent)
    if old_trash is not None:
        try:
            shutil.rmtree(old_trash)
        except OSError as e:  # the new export is in place; a leftover is cleaned next run
            log.warning("published %s but could not delete the old export %s: %s", final_dir, old_trash, e)
    return final_dir


# -- verify -------------------------------------------------------------------------------
def verify_export(path: PathLike) -> list[str]:
    """Check an export; return human-readable problems (an empty list means it is good).

    Checks: the manifest exists and parses; every listed file exists with the recorded size
    and sha256; no safetensors file is missing from the manifest; every file the index names
    exists and every key it maps is in that shard's header; ``config.json`` is valid JSON.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems: list[str] = []

    manifest = None
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        problems.append(f"{MANIFEST_NAME} is missing")
    else:
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"{MANIFEST_NAME} is not valid JSON: {e}")
        if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
            problems.append(f"{MANIFEST_NAME} has no 'files' table")
            manifest = None

    listed: dict = manifest["files"] if manifest else {}
    for rel, info in sorted(listed.items()):
        fp = path / rel
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
        for p in sorted(path.rglob("*.safetensors")):
            rel = p.relative_to(path).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: safetensors file not listed in the manifest")

    problems.extend(_check_index(path))

    cpath = path / "config.json"
    if not cpath.is_file():
        problems.append("config.json is missing")
    else:
        try:
            cfg = json.loads(cpath.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                problems.append("config.json is not a JSON object")
        except (OSError, ValueError) as e:
            problems.append(f"config.json is not valid JSON: {e}")
    return problems


def _shard_keys(fp: Path) -> set:
    from safetensors import safe_open

    with safe_open(str(fp), framework="pt") as f:  # reads the header only
        return set(f.keys())


def _check_index(path: Path) -> list[str]:
    problems: list[str] = []
    ipath = path / INDEX_NAME
    if not ipath.is_file():
        if (path / "model.safetensors").is_file():
            try:
                _shard_keys(path / "model.safetensors")
            except Exception as e:
                problems.append(f"model.safetensors cannot be opened: {e}")
        else:
            problems.append(f"no weights: neither {INDEX_NAME} nor model.safetensors exists")
        return problems
    try:
        index = json.loads(ipath.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("'weight_map' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{INDEX_NAME} is not a valid index: {type(e).__name__}: {e}"]
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(str(fname), []).append(key)
    for fname, keys in sorted(by_file.items()):
        fp = path / fname
        if not fp.is_file():
            problems.append(f"{INDEX_NAME} maps {len(keys)} tensor(s) to {fname}, which does not exist")
            continue
        try:
            have = _shard_keys(fp)
        except Exception as e:
            problems.append(f"{fname} cannot be opened as safetensors: {e}")
            continue
        missing = sorted(set(keys) - have)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"{fname} lacks {len(missing)} key(s) the index maps to it: {missing[:5]}{more}")
    for p in sorted(path.glob("*.safetensors")):
        if p.name not in by_file:
            problems.append(f"{p.name}: safetensors file not referenced by {INDEX_NAME}")
    return problems


# -- latest pointer and retention ---------------------------------------------------------
def update_latest(parent: PathLike, final_dir: PathLike) -> None:
    """Point ``parent/latest`` (relative symlink) and ``parent/latest.txt`` at ``final_dir``.

    Both are replaced atomically (temporary + ``os.replace``), so readers see the old or the
    new target.  ``latest.txt`` (the name plus a newline) serves filesystems without
    symlinks; if symlinks are unsupported only the text file is written.
    """
    parent, final_dir = Path(parent), Path(final_dir)
    if final_dir.parent.resolve() != parent.resolve():
        raise ValueError(f"latest pointer in {parent} can only point at a directory in it, got {final_dir}")
    if not final_dir.is_dir():
        raise FileNotFoundError(f"cannot point latest at {final_dir}: it is not a directory")
    link = parent / LATEST_LINK
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; refusing to replace it")
    tmp = parent / f".{LATEST_LINK}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(final_dir.name, tmp, target_is_directory=True)
    except (OSError, NotImplementedError) as e:
        log.info("symlinks unavailable in %s (%s); writing only %s", parent, e, LATEST_TXT)
    else:
        try:
            os.replace(tmp, link)
        except BaseException:
            os.unlink(tmp)
            raise
    _atomic_write_text(parent / LATEST_TXT, final_dir.name + "\n")
    _fsync_dir(parent)


def apply_retention(owned: Iterable[PathLike], keep_last_k: Optional[int]) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` of ``owned`` (exports this process made).

    ``owned`` is oldest first.  ``keep_last_k`` of ``None`` or <= 0 keeps everything.  The
    newest is never deleted, and neither is anything that is not a real directory with our
    manifest (a user may have replaced it).  Returns the removed paths.
    """
    owned = [Path(p) for p in owned]
    if keep_last_k is None or keep_last_k <= 0 or len(owned) <= keep_last_k:
        return []
    newest = owned[-1]
    removed = []
    for p in owned[:-keep_last_k]:
        if p == newest or not os.path.lexists(p):
            continue
        if not is_our_export(p):
            log.warning("retention: not deleting %s, it is not an export written by %s", p, PRODUCER_NAME)
            continue
        try:
            _remove_tree(p)
        except OSError as e:
            log.warning("retention: could not delete %s: %s", p, e)
            continue
        removed.append(p)
    return removed
