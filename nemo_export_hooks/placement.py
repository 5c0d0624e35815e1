"""Where an export goes, for every adapter: the export directory of each export
(:meth:`Placement.target`), the directories exports may go to (:meth:`Placement.export_dirs`),
what may be written inside a training checkpoint (:attr:`Placement.inside`), the tokenizer
(:meth:`Placement.tokenizer`), and the checks of export names (filename templates, name
length, reserved names).

Why one object: the Lightning / NeMo 2 and the Megatron-Bridge adapters each wrote these
rules, and ``placement="auto"`` meant different things in each without saying so.  The
difference is now data, :class:`AdapterDefaults` (:data:`LIGHTNING`, :data:`BRIDGE`):

* Lightning / NeMo 2: ``auto`` is ``subdir`` when the trainer's checkpoint callback is
  NeMo's ``ModelCheckpoint`` (NeMo's resume logic counts every directory beside its
  checkpoints as one) and ``sibling`` otherwise; ``inside`` is refused.
* Megatron-Bridge: ``auto`` is ``inside`` (``iter_N/hf``, deleted with ``iter_N`` by Bridge's
  rotation, as Bridge itself does); exports that belong to no checkpoint go to ``hf/``.

This module imports nothing from the exporter, the scheduler or the adapters; the config
schema (:mod:`nemo_export_hooks.config`) reads its name checks from here.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any, Iterable, Optional

from .store.layout import RESERVED_NAMES, STAGING_OVERHEAD

__all__ = [
    "PLACEMENTS",
    "TEMPLATE_FIELDS",
    "HF_SUFFIX",
    "HF_SUBDIR",
    "AdapterDefaults",
    "LIGHTNING",
    "BRIDGE",
    "Placement",
    "render_filename",
    "check_filename_template",
    "name_max",
    "note_symlinked_dirpath",
    "tokenizer_saver",
    "TOKENIZER_FILES",
]

log = logging.getLogger("nemo_export_hooks")

PLACEMENTS = ("auto", "sibling", "subdir", "inside")
TEMPLATE_FIELDS = ("checkpoint", "step", "epoch")
HF_SUFFIX = "-hf"
HF_SUBDIR = "hf"


@dataclass(frozen=True)
class AdapterDefaults:
    """What one adapter's placements mean.

    ``auto``: what ``placement="auto"`` resolves to, a placement or ``"nemo-subdir"``
    (``subdir`` with NeMo's ``ModelCheckpoint``, ``sibling`` otherwise).
    ``allows_inside``: ``placement="inside"`` is possible (the framework keeps exports in
    its checkpoint directories).  ``sibling_without_checkpoint``: an export that belongs
    to no checkpoint (``every_n_train_steps``, ``at_train_end``) goes beside the
    checkpoints under ``sibling`` (else always into ``hf/``)."""

    name: str
    auto: str
    allows_inside: bool
    sibling_without_checkpoint: bool


LIGHTNING = AdapterDefaults("Lightning / NeMo", auto="nemo-subdir", allows_inside=False, sibling_without_checkpoint=True)
BRIDGE = AdapterDefaults("Megatron-Bridge", auto="inside", allows_inside=True, sibling_without_checkpoint=False)


class Placement:
    """The placement policy of one callback: its config's ``placement``, ``dirpath``,
    ``filename`` and ``tokenizer`` read with its adapter's :class:`AdapterDefaults`.
    Raises ``ValueError`` for a placement the adapter cannot honour."""

    def __init__(self, config: Any, adapter: AdapterDefaults):
        self.config, self.adapter = config, adapter
        if config.placement == "inside" and not adapter.allows_inside:
            raise ValueError(
                "hf_export.placement='inside' puts exports inside their checkpoint, which only Megatron-Bridge's "
                f"iter_N directories allow; use auto, sibling or subdir with {adapter.name}"
            )

    # -- the placement ----------------------------------------------------------------------
    def mode(self, nemo_checkpointing: bool = False) -> str:
        """The placement in force: ``placement`` unless ``auto``, which the adapter decides
        (``nemo_checkpointing``: the trainer saves with NeMo's ``ModelCheckpoint``)."""
        p = self.config.placement
        if p != "auto":
            return p
        if self.adapter.auto == "nemo-subdir":
            return "subdir" if nemo_checkpointing else "sibling"
        return self.adapter.auto

    @property
    def inside(self) -> bool:
        """Checkpoint exports go inside the checkpoint (``iter_N/hf``): ``dirpath``
        overrides it.  The scheduler then allows exactly that place inside a checkpoint."""
        return self.mode() == "inside" and self.config.dirpath is None

    # -- where one export goes ------------------------------------------------------------
    def target(self, name: str, step: int, epoch: int, checkpoint: Optional[str], checkpoint_dir: Path, mode: Optional[str] = None) -> Path:
        """The export directory of one export: ``name`` fills ``{checkpoint}``
        (the checkpoint's name, or the adapter's name for a step without one),
        ``checkpoint`` is the checkpoint being saved (``None``: no checkpoint),
        ``checkpoint_dir`` the directory checkpoints go to; ``mode`` as :meth:`mode`."""
        cfg = self.config
        mode = self.mode() if mode is None else mode
        if cfg.dirpath is not None:
            base, default = Path(cfg.dirpath).expanduser(), "{checkpoint}"
        elif checkpoint is not None and mode == "inside":
            return Path(str(checkpoint)) / render_filename(cfg.filename or HF_SUBDIR, checkpoint=name, step=step, epoch=epoch)
        elif mode == "sibling" and (checkpoint is not None or self.adapter.sibling_without_checkpoint):
            base, default = Path(checkpoint_dir), "{checkpoint}" + HF_SUFFIX
        else:
            base, default = Path(checkpoint_dir) / HF_SUBDIR, "{checkpoint}"
        if "://" in str(base):
            raise ValueError(f"export directory {base} is not a filesystem path; set hf_export.dirpath")
        return base / render_filename(cfg.filename or default, checkpoint=name, step=step, epoch=epoch)

    def export_dirs(self, checkpoint_dirs: Iterable[Path], default_dir: Optional[Path], mode: Optional[str] = None) -> list[Path]:
        """Every directory exports may go to (checked writable and outside every training
        checkpoint at start): ``dirpath``, or the directories of ``checkpoint_dirs`` that
        checkpoint exports use, plus, for exports without a checkpoint, that of
        ``default_dir`` (the adapter's checkpoint directory for them)."""
        cfg = self.config
        if cfg.dirpath is not None:
            return [Path(cfg.dirpath).expanduser()]
        mode = self.mode() if mode is None else mode
        dirs: list[Path] = []
        for d in checkpoint_dirs:
            d = Path(d) / HF_SUBDIR if mode == "subdir" else Path(d)  # sibling: beside; inside: in its iter_N
            if d not in dirs:
                dirs.append(d)
        if default_dir is not None and (cfg.every_n_train_steps or cfg.at_train_end):
            beside = mode == "sibling" and self.adapter.sibling_without_checkpoint
            d = Path(default_dir) if beside else Path(default_dir) / HF_SUBDIR
            if d not in dirs:
                dirs.append(d)
        return dirs

    # -- the tokenizer ----------------------------------------------------------------------
    def tokenizer(self, found: Iterable[Any] = (), model_dirs: Iterable[Any] = ()) -> Any:
        """What the exports' tokenizer is: a directory (``str``), an object with
        ``save_pretrained``, or ``None``.  For ``tokenizer="auto"`` the first of ``found``
        (tokenizers the framework holds) that can be saved, else the first of
        ``model_dirs`` that is a directory, else ``None``."""
        tok = self.config.tokenizer
        if isinstance(tok, (str, Path)) and str(tok) == "auto":
            for t in found:
                saver = tokenizer_saver(t)
                if saver is not None:
                    return saver
            for d in model_dirs:
                if d and Path(str(d)).is_dir():
                    return str(d)
            return None
        if isinstance(tok, (str, Path)):
            return str(Path(tok).expanduser())
        return tok


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def tokenizer_saver(tok: Any):
    """The object whose ``save_pretrained`` writes ``tok``'s files: the tokenizer itself, or
    the HF tokenizer inside a wrapper (NeMo's ``AutoTokenizer`` keeps it as ``.tokenizer``)."""
    if tok is None:
        return None
    if callable(getattr(tok, "save_pretrained", None)):
        return tok
    inner = getattr(tok, "tokenizer", None)
    if inner is not None and callable(getattr(inner, "save_pretrained", None)):
        return inner
    return None


def name_max(directory: Any = None) -> int:
    """The file system's limit on one name (``NAME_MAX``, in bytes) where ``directory`` is
    or would be created: asked of its nearest existing ancestor (the working directory when
    ``None``); 255, the common limit, when the system cannot tell."""
    p = Path(directory).expanduser().absolute() if directory is not None else Path.cwd()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


_NOTED: set = set()


def note_symlinked_dirpath(dirpath: Any) -> Optional[Path]:
    """A ``dirpath`` reached through a symlink is followed: exports, their staging
    directories and ``latest`` are created in the directory it resolves to (so the atomic
    rename happens on that file system).  Logged once per process and (path, target), so the
    redirection is never silent; returns the resolved directory, or ``None`` when no
    symlink is involved."""
    p = Path(dirpath).expanduser().absolute()
    real = Path(os.path.realpath(p))
    if real == Path(os.path.normpath(p)):
        return None
    key = (str(p), str(real))
    if key not in _NOTED:
        _NOTED.add(key)
        link = next((q for q in (p, *p.parents) if q.is_symlink()), p)
        log.info("hf_export: dirpath %s goes through the symlink %s -> %s; exports are written in %s", p, link, os.readlink(link) if link.is_symlink() else "?", real)
    return real


def check_filename_template(template: str, directory: Any = None) -> None:
    """Reject a filename template that is not one safe path component, or whose rendered
    names cannot be created in ``directory`` (too long for its file system, counting the
    staging name made from it)."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"filename must be a non-empty template string, got {template!r}")
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"filename {template!r} is not a valid template: {e}") from None
    for _, fname, _, _ in parsed:
        if fname is None:
            continue
        if fname not in TEMPLATE_FIELDS:
            raise ValueError(f"filename {template!r} uses {{{fname}}}; allowed fields: " + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))
    limit = name_max(directory)
    samples = (
        {"checkpoint": "epoch=0-step=10", "step": 10, "epoch": 0},
        {"checkpoint": "x", "step": 0, "epoch": 0},
        {"checkpoint": "epoch=999-step=999999999", "step": 999_999_999, "epoch": 999},  # long runs
    )
    for sample in samples:
        try:
            name = template.format(**sample)
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"filename {template!r} cannot be rendered: {type(e).__name__}: {e}") from None
        _check_component(name, template, limit)


def _check_component(name: str, template: str, limit: int = 255) -> None:
    why = None
    bad = sorted({c for c in name if unicodedata.category(c) == "Cc"})
    if not name:
        why = "it renders to an empty name"
    elif bad:
        why = "it contains control character(s) " + ", ".join(repr(c) for c in bad)
    elif name != name.strip():
        why = "it starts or ends with whitespace"
    elif name.startswith("/") or Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        why = "it is an absolute path"
    elif ".." in name.replace("\\", "/").split("/"):
        why = "'..' escapes the export directory"
    elif "/" in name or "\\" in name:
        why = "it contains a path separator (it must be one directory name inside dirpath)"
    elif name == ".":
        why = "it is the export directory itself"
    elif name.startswith("."):
        why = "hidden names are reserved for staging directories"
    elif name in RESERVED_NAMES:
        why = f"{name!r} is reserved for the latest-export pointer"
    else:
        try:
            n = len(os.fsencode(name))
        except UnicodeError:
            why = "it cannot be encoded as a file name on this system"
        else:
            if n + STAGING_OVERHEAD > limit:
                why = (
                    f"it renders to a name of {n} bytes ({name[:40]!r}...); with its staging name "
                    f"(.NAME.staging-XXXXXXXX, {STAGING_OVERHEAD} bytes more) that exceeds the file system's "
                    f"limit of {limit} bytes per name (at most {limit - STAGING_OVERHEAD})"
                )
    if why:
        raise ValueError(f"filename {template!r} is rejected: {why}")


def render_filename(template: str, checkpoint: str, step: int, epoch: int, directory: Any = None) -> str:
    """Render a (checked) filename template; the result is re-checked (its length against
    ``NAME_MAX`` of ``directory``, 255 when not given)."""
    name = template.format(checkpoint=checkpoint, step=int(step), epoch=int(epoch))
    _check_component(name, template, name_max(directory) if directory is not None else 255)
    return name
