"""Committing an export directory: staging, the atomic rename, ``latest``, retention, and
the refusals of a target directory.

Why: an export is written next to a live training checkpoint and may be read (by an eval
job, an uploader) at any moment.  A reader must never see a half-written export, a crash
must leave nothing that looks like an export, and housekeeping must never delete a
directory this library did not create.  So:

* every export is written into a hidden *staging* sibling of its final directory
  (:func:`make_staging_dir`), on the same filesystem so the final ``os.rename`` is atomic;
* the manifest (:mod:`.manifest`) is the proof of ownership that :func:`publish`
  (overwrite) and :func:`apply_retention` require before deleting anything;
* :func:`publish` fsyncs and renames staging -> final; :func:`clean_stale_staging` removes
  what a crash left behind, matching only our own hidden staging/trash names;
* before anything is gathered, :func:`check_target_dir` refuses a target directory inside
  a training checkpoint, or one that exists and is not this run's.

"Target directory" here is where one export goes (not the HF tensor names a plan's job
targets).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

from .fs import (
    PathLike,
    atomic_write_text,
    dir_lock,
    fsync_dir,
    fsync_tree,
    lock_staging,
    locked_here,
    named,
    prune_locks,
    release_staging,
    remove_tree,
    staging_in_use,
)
from .layout import (
    LATEST_LINK,
    LATEST_TMP_RE,
    LATEST_TXT,
    MANIFEST_NAME,
    PRODUCER_NAME,
    is_staging_name,
    is_trash_name,
    staging_name,
    staging_prefix,
    trash_name,
)
from .manifest import deletable_export, is_our_export, manifest_step, ownership

__all__ = [
    "make_staging_dir",
    "clean_stale_staging",
    "publish",
    "update_latest",
    "apply_retention",
    "LATEST_LOCK_TIMEOUT_S",
    "ExportRefusedError",
    "check_writable",
    "checkpoint_markers",
    "training_checkpoint_containing",
    "refuse_inside_checkpoint",
    "check_target_dir",
    "inside_its_checkpoint",
    "same_lineage",
    "remove_staging_of",
]

log = logging.getLogger("nemo_export_hooks.publish")


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
    prune_locks()
    lock_staging(staging)
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
    prune_locks()
    now = time.time()
    removed = []
    for entry in sorted(parent.iterdir()):
        if LATEST_TMP_RE.match(entry.name) and (entry.is_symlink() or entry.is_file()):
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
            if locked_here(entry):  # our own, abandoned: this process is not writing it now
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
        fsync_tree(staging)
    except OSError as e:
        raise named(e, f"cannot fsync {e.filename or staging}") from e
    fsync_dir(staging.parent)

    old_trash: Optional[Path] = None
    if replacing:
        old_trash = parent / trash_name(final_dir.name)
        try:
            os.rename(final_dir, old_trash)
        except OSError as e:
            raise named(e, f"cannot move the old export {final_dir} aside to {old_trash.name}") from e
    try:
        os.rename(staging, final_dir)
    except BaseException as e:
        if old_trash is not None:
            os.rename(old_trash, final_dir)
        if isinstance(e, OSError):
            raise named(e, f"cannot rename {staging} to {final_dir}") from e
        raise
    release_staging(staging)
    fsync_dir(parent)
    if old_trash is not None:
        try:
            shutil.rmtree(old_trash)
        except OSError as e:  # the new export is in place; a leftover is cleaned next run
            log.warning("published %s but could not delete the old export %s: %s", final_dir, old_trash, e)
    return final_dir


# -- latest pointer -----------------------------------------------------------------------
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
    with dir_lock(parent, timeout, f"to point latest at {final_dir.name}", on_wait):
        current = _latest_target(parent)
        new_step, cur_step = manifest_step(final_dir), manifest_step(current) if current is not None else None
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
                    raise named(e, f"cannot replace {link}") from e
                raise
        atomic_write_text(parent / LATEST_TXT, final_dir.name + "\n")
        fsync_dir(parent)
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


# -- retention ----------------------------------------------------------------------------
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
            remove_tree(p)
        except OSError as e:
            log.warning("retention: could not delete %s: %s", p, e)
            continue
        removed.append(p)
    return removed


# -- refusals of a target directory -----------------------------------------------------
def check_writable(d: Path) -> None:
    """``d`` can be created (or exists) and is writable: checked on its nearest existing
    ancestor, without creating anything."""
    p = Path(d).expanduser().absolute()
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"hf_export: cannot create export directory {d}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"hf_export: export directory {d} is not writable ({p} is not writable)")


class ExportRefusedError(ValueError):
    """An export the callback refuses to write (nothing was written for it): its directory
    is inside a training checkpoint, or its target exists and is not this run's export."""


def checkpoint_markers(d: Path) -> Optional[str]:
    """What makes directory ``d`` a training checkpoint, or ``None``.

    Checkpoint names are chosen by the checkpoint callback at save time, so they are
    recognised by their layout: NeMo 2 (``weights/`` + ``context/io.json``), a
    torch.distributed.checkpoint (``.metadata``), a Megatron distributed checkpoint
    (``metadata.json`` + ``common.pt``), a Lightning checkpoint saved as a directory
    (``*.ckpt``, sharded strategies)."""
    try:
        if d.name.endswith(".ckpt") and d.is_dir():
            return "a Lightning checkpoint directory"
        if (d / "weights").is_dir() and (d / "context" / "io.json").is_file():
            return "a NeMo checkpoint: weights/ and context/io.json"
        if (d / ".metadata").is_file():
            return "a torch.distributed checkpoint: .metadata"
        if (d / "metadata.json").is_file() and (d / "common.pt").is_file():
            return "a Megatron distributed checkpoint: metadata.json and common.pt"
    except OSError:  # an unreadable ancestor is not judged a checkpoint
        return None
    return None


def training_checkpoint_containing(d: Path, checkpoint: Optional[str] = None) -> Optional[tuple[Path, str]]:
    """The training checkpoint ``d`` lies in (``d`` itself or an ancestor): ``checkpoint``
    (the one being saved, whose path is known) or any existing directory laid out like one.
    Symlinks are resolved, so a link into a checkpoint is caught too."""
    real = Path(os.path.realpath(Path(d).expanduser()))
    if checkpoint is not None and "://" not in str(checkpoint):
        ck = Path(os.path.realpath(Path(str(checkpoint)).expanduser()))
        if real == ck or ck in real.parents:
            return ck, "the checkpoint being saved"
    for p in (real, *real.parents):
        if not p.is_dir():
            continue  # not created yet: cannot be a checkpoint now
        why = checkpoint_markers(p)
        if why is not None:
            return p, why
    return None


def refuse_inside_checkpoint(d: Path, checkpoint: Optional[str] = None, allow_inside: bool = False) -> None:
    """Raise if export directory ``d`` is inside a training checkpoint.  Such an export
    would change the checkpoint, and the checkpoint manager (``save_top_k``, NeMo's
    rotation) deletes it with the checkpoint.

    ``allow_inside``: ``d`` *is* the checkpoint being saved (``checkpoint``), where the
    framework itself keeps its HF export (Megatron-Bridge's ``iter_N/hf``, deleted with
    ``iter_N`` on purpose): allowed there, and only there."""
    if allow_inside and checkpoint is not None:
        real = Path(os.path.realpath(Path(d).expanduser()))
        if real == Path(os.path.realpath(Path(str(checkpoint)).expanduser())):
            return
    hit = training_checkpoint_containing(d, checkpoint)
    if hit is not None:
        ck, why = hit
        raise ExportRefusedError(
            f"hf_export: export directory {d} is inside the training checkpoint {ck} ({why}); the checkpoint "
            "manager may delete or rotate it with the export, and the export would change the checkpoint: "
            "set hf_export.dirpath to a directory outside every training checkpoint"
        )


def check_target_dir(path: Path, checkpoint: Optional[str], owned: list, run_id: Optional[str] = None, allow_inside: bool = False) -> None:
    """Rank 0, before an export starts: refuse a target inside a training checkpoint, and an
    existing target this run did not create.

    An existing directory is replaced when it is in ``owned`` (this run's exports, and
    after a resume those recorded in the training checkpoint), when it is an export of ours
    whose manifest carries ``run_id`` (the same run lineage: after a crash and a resume
    from an older checkpoint, exports made after that checkpoint belong to a discarded
    future and are replaced from the resumed weights), or when it is an empty directory.
    Anything else (an earlier run's export sharing ``dirpath`` and names, a user's
    directory, a symlink) is refused."""
    path = Path(path)
    refuse_inside_checkpoint(path.parent, checkpoint, allow_inside=allow_inside)
    if inside_its_checkpoint(path, checkpoint, allow_inside) and not os.path.isdir(path.parent):
        raise ExportRefusedError(
            f"refusing to write {path}: its checkpoint directory {path.parent} no longer exists (deleted by the "
            "checkpoint rotation?); an export inside a checkpoint never re-creates it"
        )
    if str(path) in owned or not os.path.lexists(path):
        return
    if run_id is not None and same_lineage(path, run_id):
        return
    try:
        empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        empty = False
    if not empty:
        raise ExportRefusedError(
            f"refusing to write {path}: it exists and was not created by this run (an earlier run's export "
            "sharing hf_export.dirpath and filename, or someone else's file); choose another dirpath or "
            "filename, or remove it"
        )


def inside_its_checkpoint(path: Path, checkpoint: Optional[str], allow_inside: bool) -> bool:
    """``path`` is an export placed directly inside ``checkpoint`` (Megatron-Bridge's
    ``iter_N/hf``): its parent must exist, never be created by the export."""
    return bool(allow_inside and checkpoint is not None and "://" not in str(checkpoint) and Path(path).parent == Path(str(checkpoint)))


def same_lineage(path: Path, run_id: str) -> bool:
    """``path`` is a real directory holding an export of ours whose manifest names ``run_id``."""
    return ownership(path).of_run(run_id)


def remove_staging_of(final: Path) -> None:
    """Remove staging leftovers of one export (its own hidden ``.{name}.staging-*``)."""
    parent = Path(final).parent
    if not parent.is_dir():
        return
    prefix = staging_prefix(Path(final).name)
    for p in parent.iterdir():
        if p.name.startswith(prefix) and is_staging_name(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
