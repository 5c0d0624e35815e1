"""The export manifest, and the one answer to "is this directory our export, of which
run?" (:func:`ownership`).

Why one answer: overwriting, retention, a resumed run adopting an export and the driver's
refusal of a foreign directory all decide by it; written six times, the six drifted (one
only checked that a manifest file existed).  The manifest records every file's size and
sha256, the producer, the run identity and the step; it is written last, so a directory
with a valid manifest is a complete export.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .fs import PathLike, atomic_write_text, known_digest, read_json, sha256_file
from .layout import MANIFEST_NAME, PRODUCER_NAME, PRODUCER_NAMES

__all__ = [
    "Ownership",
    "ownership",
    "write_manifest",
    "read_manifest",
    "manifest_digest",
    "is_our_export",
    "deletable_export",
    "manifest_step",
    "new_run_id",
    "producer_version",
]

_RESERVED_KEYS = ("files", "producer", "created_utc", "manifest_version", "manifest_sha256")


def producer_version() -> str:
    from .._version import __version__

    return __version__


@dataclass(frozen=True)
class Ownership:
    """Whether a directory is an export this library wrote, and what its manifest says.

    ``ours``: a real directory (no symlink) whose manifest parses and names our producer
    (either spelling, :data:`~.layout.PRODUCER_NAMES`).  ``manifest``: the parsed manifest
    when there is one (also for a foreign one), ``why_not``: the reason when not ours."""

    ours: bool
    manifest: Optional[dict] = None
    why_not: str = ""

    @property
    def run_id(self) -> Any:
        """The run identity the manifest records (``None``: none, or not ours)."""
        return self.manifest.get("run_id") if self.ours and self.manifest else None

    @property
    def step(self) -> Optional[int]:
        """The training step the manifest records, when it is an int and the export ours."""
        step = self.manifest.get("step") if self.ours and self.manifest else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def of_run(self, run_id: Optional[str]) -> bool:
        """Ours, and written by run (lineage) ``run_id``."""
        return self.ours and run_id is not None and self.run_id == run_id


def ownership(directory: PathLike) -> Ownership:
    """Is ``directory`` an export of ours, and of which run and step?  Never raises: an
    unreadable directory or manifest is simply not ours."""
    directory = Path(directory)
    try:
        if directory.is_symlink() or not directory.is_dir():
            return Ownership(False, None, "it is not a directory")
    except OSError as e:
        return Ownership(False, None, f"it cannot be inspected: {e}")
    m = read_manifest(directory)
    if m is None:
        return Ownership(False, None, f"it has no readable {MANIFEST_NAME}")
    producer = m.get("producer")
    if isinstance(producer, dict) and producer.get("name") in PRODUCER_NAMES:
        return Ownership(True, m)
    return Ownership(False, m, f"its {MANIFEST_NAME} was not written by {PRODUCER_NAME}")


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
            digest = known_digest(p)
        files[rel] = {"bytes": size, "sha256": digest or sha256_file(p)}

    manifest = dict(meta)
    manifest.update(
        {
            "manifest_version": 1,
            "producer": {"name": PRODUCER_NAME, "version": producer_version()},
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": files,
        }
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: a changed byte in the
    manifest itself (a step, a producer) is caught too, not only changes to the files."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, indent=2, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The parsed manifest of ``directory``, or ``None`` if absent or unreadable."""
    try:
        data = read_json(Path(directory) / MANIFEST_NAME)  # a bounded regular file, never a FIFO
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_our_export(directory: PathLike) -> bool:
    """True if ``directory`` is a real directory holding a manifest written by this library
    (:func:`ownership`)."""
    return ownership(directory).ours


def manifest_step(directory: PathLike) -> Optional[int]:
    """The step recorded by ``directory``'s manifest, if it is an export of ours."""
    return ownership(directory).step


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
    own = ownership(directory)
    m = own.manifest
    if not own.ours or not isinstance(m.get("files"), dict):
        return f"it has no {MANIFEST_NAME} written by {PRODUCER_NAME}"
    if "manifest_sha256" in m and m["manifest_sha256"] != manifest_digest(m):
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
