"""Where an export may go, and what it may not replace: the refusals every framework's
hook shares, decided before anything is gathered or written.

* :func:`check_writable`: a directory exports go to can be created and written.
* :func:`training_checkpoint_containing` / :func:`refuse_inside_checkpoint`: an export
  directory inside a training checkpoint is refused (the checkpoint manager may delete or
  rotate it, and the export would change the checkpoint), except the one place a framework
  itself puts exports inside the checkpoint being saved (Megatron-Bridge's ``iter_N/hf``,
  ``allow_inside=True``).
* :func:`check_target`: an existing directory under the export's name is replaced only if
  this run made it (``owned``) or its manifest carries this run lineage's ``run_id``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = [
    "ExportRefusedError",
    "check_writable",
    "checkpoint_markers",
    "training_checkpoint_containing",
    "refuse_inside_checkpoint",
    "check_target",
    "remove_staging_of",
    "same_lineage",
    "inside_its_checkpoint",
]


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


def check_target(path: Path, checkpoint: Optional[str], owned: list, run_id: Optional[str] = None, allow_inside: bool = False) -> None:
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
    from .publish import read_manifest

    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        m = read_manifest(path)
    except Exception:
        return False
    return bool(m) and (m.get("producer") or {}).get("name") == "nemo-export-hooks" and m.get("run_id") == run_id


def remove_staging_of(final: Path) -> None:
    """Remove staging leftovers of one export (its own hidden ``.{name}.staging-*``)."""
    from .publish import is_staging_name

    parent = Path(final).parent
    if not parent.is_dir():
        return
    prefix = f".{Path(final).name}.staging-"
    for p in parent.iterdir():
        if p.name.startswith(prefix) and is_staging_name(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


