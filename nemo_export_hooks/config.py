"""``ExportConfig``: what :class:`~nemo_export_hooks.callback.HFExportCallback` exports, when,
and where.  A plain dataclass that is also an OmegaConf structured config, so the same
schema serves Python code, YAML (``nemo_export_hooks/conf/hf_export/*.yaml``) and Hydra command lines
(``hf_export.enabled=true hf_export.keep_last_k=3``).

Everything that can be checked without a trainer is checked by :meth:`ExportConfig.validate`
(called by the callback's constructor and again at ``setup``): a run must not fail at step
10,000 for something knowable at step 0.

Where exports go (``placement``, ``dirpath``, ``filename``)
-----------------------------------------------------------
By default an export sits beside the training checkpoint it belongs to and is named after
it, with the ``-hf`` suffix:

=====================================  ==========================================
training checkpoint                    Hugging Face export
=====================================  ==========================================
``.../checkpoints/epoch=0-step=10.ckpt``   ``.../checkpoints/epoch=0-step=10-hf``
``.../checkpoints/<name>`` (directory)     ``.../checkpoints/<name>-hf``
no checkpoint (``every_n_train_steps``,    ``<trainer checkpoint dir>/step=<step>-hf``
``at_train_end``)
=====================================  ==========================================

``placement="subdir"`` puts them one level down instead: ``.../checkpoints/hf/<name>``.
``placement="auto"`` (the default) picks ``subdir`` when the trainer's checkpoint callback
is NeMo's ``ModelCheckpoint`` and ``sibling`` otherwise, because NeMo's resume logic
(``nemo_topk_check_previous_run``) treats *every* directory beside its checkpoints as a
checkpoint, parses its monitor value from the name, and may delete real checkpoints to
enforce ``save_top_k``; a ``<name>-hf`` sibling would be counted as one.

``dirpath`` (a directory) overrides the placement: every export goes there, named by
``filename``.  ``filename`` is a template with the fields ``{checkpoint}`` (the checkpoint's
name without ``.ckpt``; ``step=<step>`` for exports that belong to no checkpoint),
``{step}`` and ``{epoch}`` (format specs allowed: ``hf-{step:07d}``).  Its default is
``{checkpoint}-hf`` beside checkpoints and ``{checkpoint}`` elsewhere.  A filename must be
one path component: absolute paths, ``..``, separators, hidden names and the reserved
``latest`` / ``latest.txt`` are rejected.
"""

import logging
import os
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Formatter
from typing import Any, Dict, Mapping, Optional

from .store.layout import RESERVED_NAMES, STAGING_OVERHEAD

__all__ = [
    "ExportConfig",
    "PLACEMENTS",
    "ON_BUSY",
    "TEMPLATE_FIELDS",
    "HF_SUFFIX",
    "HF_SUBDIR",
    "render_filename",
    "check_filename_template",
    "name_max",
    "note_symlinked_dirpath",
]

log = logging.getLogger("nemo_export_hooks")

PLACEMENTS = ("auto", "sibling", "subdir", "inside")
ON_BUSY = ("skip", "wait")
TEMPLATE_FIELDS = ("checkpoint", "step", "epoch")
HF_SUFFIX = "-hf"
HF_SUBDIR = "hf"


@dataclass
class ExportConfig:
    """Options of :class:`~nemo_export_hooks.callback.HFExportCallback`.

    What
        enabled: export at all (``False`` makes the callback a no-op; ``callbacks_from_cfg``
            returns no callback).  The recipes' YAML default is ``false``, flipped by
            ``hf_export.enabled=true``; a callback constructed in Python is on.
        arch: Hugging Face ``model_type`` to write (``qwen3_moe``, ``qwen3``, ``llama``,
            ``qwen2``, ``mixtral``, ...); required.
        dtype: dtype of unquantized tensors (``bfloat16``, ``float16``, ``float32``).
        tokenizer: ``None``; a directory with tokenizer files; ``"auto"`` (the tokenizer of
            the LightningModule or datamodule, e.g. NeMo's, if it can ``save_pretrained``);
            or a tokenizer object (Python only; pass it as ``HFExportCallback(tokenizer=...)``
            when the config comes from YAML).
        hf_config_overrides: keys merged into the generated ``config.json``.
        expect_quant: ``"FP8"`` / ``"NVFP4"``: at setup, require that the model carries
            ModelOpt quantizers of that format (a QAT run fails at step 0 otherwise).
        max_shard_size: size bound of each safetensors shard (``"5GB"``, ``"2GiB"``).

    When
        on_checkpoint_save: export for every training checkpoint that is saved (any
            ``trainer.save_checkpoint`` call: Lightning's or NeMo's ``ModelCheckpoint``).
        every_n_train_steps: also export every N optimizer steps (``None``/0: off).  If a
            checkpoint is saved at the same step, the export is named after it.
        at_train_end: also export the final weights when training ends (waits for an
            export in flight rather than skipping).
        A step is never exported twice, also not after a restart (the callback's state is
        saved in the training checkpoint).

    Where
        placement, dirpath, filename: see the module docstring.

    How
        async_write: the training loop waits only for the host copy of each rank's share;
            gathering is done then, and writing, committing and publishing run in a
            background thread.  ``False``: everything on the training thread.
        on_busy: a trigger while an export is in flight: ``skip`` (log a warning) or
            ``wait``.
        keep_last_k: keep only the newest K exports this callback made (``None``/0: all).
        update_latest: maintain a ``latest`` symlink (and ``latest.txt``) in the export
            directory pointing at the newest export.
        fail_on_error: ``False``: log a failed export with its cause, clean its staging
            directory and keep training; ``True``: raise (the run stops).
        log_metrics: log ``hf_export/*`` metrics to the trainer's loggers.
    """

    enabled: bool = True
    arch: Optional[str] = None
    dtype: str = "bfloat16"
    tokenizer: Any = None
    hf_config_overrides: Dict[str, Any] = field(default_factory=dict)
    expect_quant: Optional[str] = None
    max_shard_size: str = "5GB"
    # triggers
    on_checkpoint_save: bool = True
    every_n_train_steps: Optional[int] = None
    at_train_end: bool = False
    # where
    placement: str = "auto"
    dirpath: Optional[str] = None
    filename: Optional[str] = None
    # how
    async_write: bool = True
    on_busy: str = "skip"
    keep_last_k: Optional[int] = None
    update_latest: bool = True
    fail_on_error: bool = False
    log_metrics: bool = True

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_any(cls, cfg: Any = None, **overrides) -> "ExportConfig":
        """Build from an ``ExportConfig``, a mapping, an OmegaConf ``DictConfig`` (validated
        against this schema: unknown keys and wrong types fail), or ``None``; then apply
        ``overrides``.  Returns a new object; the input is not modified."""
        if cfg is None:
            data: dict = {}
        elif isinstance(cfg, ExportConfig):
            data = {f.name: getattr(cfg, f.name) for f in fields(cls)}
        else:
            data = _to_plain_dict(cfg)
        data.update(overrides)
        # OmegaConf's MISSING ("???") means "not set"
        data = {k: (None if isinstance(v, str) and v == "???" else v) for k, v in data.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown hf_export option(s) {unknown}; known: {sorted(names)}")
        obj = data.get("tokenizer")
        if not _has_omegaconf() or _is_opaque(obj):
            # OmegaConf is bypassed (it cannot hold a tokenizer object): parse the boolean
            # options the way it would, so "false" never passes as a truthy string
            data = {k: (parse_bool(k, v) if k in BOOL_OPTIONS else v) for k, v in data.items()}
        if _has_omegaconf() and not _is_opaque(obj):
            # type-check through OmegaConf's structured config (same rules as Hydra)
            from omegaconf import OmegaConf

            schema = OmegaConf.structured(cls)
            merged = OmegaConf.merge(schema, OmegaConf.create(data))
            return OmegaConf.to_object(merged)
        return cls(**data)

    # -- checks -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every static problem of this config, as readable strings (empty: fine)."""
        p: list[str] = []
        for name in BOOL_OPTIONS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                p.append(f"{name} must be true or false, got {v!r} ({type(v).__name__})")
        if p or not self.enabled:
            return p
        if not self.arch:
            p.append("arch is required (the Hugging Face model_type to write, e.g. 'qwen3_moe')")
        for check in _CHECKS:  # what only the exporter knows (arch, dtype, sizes): see add_check
            p.extend(check(self))
        if self.expect_quant is not None and str(self.expect_quant).upper() not in ("FP8", "NVFP4"):
            p.append(f"expect_quant must be 'FP8', 'NVFP4' or null, got {self.expect_quant!r}")
        if not isinstance(self.hf_config_overrides, Mapping):
            p.append(f"hf_config_overrides must be a mapping, got {type(self.hf_config_overrides).__name__}")
        else:
            import json

            try:
                json.dumps(_to_plain_dict(self.hf_config_overrides))
            except (TypeError, ValueError) as e:
                p.append(f"hf_config_overrides is not JSON-serialisable: {e}")
        n = self.every_n_train_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            p.append(f"every_n_train_steps must be a non-negative integer or null, got {n!r}")
        k = self.keep_last_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            p.append(f"keep_last_k must be a non-negative integer or null, got {k!r}")
        if self.placement not in PLACEMENTS:
            p.append(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.on_busy not in ON_BUSY:
            p.append(f"on_busy must be one of {list(ON_BUSY)}, got {self.on_busy!r}")
        if self.dirpath is not None and not str(self.dirpath).strip():
            p.append("dirpath must not be empty (use null for the default placement)")
        if self.dirpath is not None and "://" in str(self.dirpath):
            p.append(f"dirpath {self.dirpath!r} is a remote URL; exports need a (shared) filesystem path")
        if self.filename is not None:
            try:
                check_filename_template(self.filename, self.dirpath)
            except ValueError as e:
                p.append(str(e))
        tok = self.tokenizer
        if isinstance(tok, (str, Path)) and str(tok) != "auto":
            d = Path(tok).expanduser()
            if not d.is_dir():
                p.append(f"tokenizer {str(tok)!r} is not a directory (give a directory with tokenizer files, 'auto' or null)")
            elif not any((d / n).is_file() for n in _TOKENIZER_FILES):
                p.append(f"tokenizer directory {str(tok)!r} has none of {', '.join(_TOKENIZER_FILES)}")
        elif tok is not None and not isinstance(tok, (str, Path)) and _tokenizer_saver(tok) is None:
            p.append(f"tokenizer object {type(tok).__name__} has no save_pretrained (nor a .tokenizer that has one)")
        return p

    def validate(self) -> "ExportConfig":
        """Raise ``ValueError`` listing every static problem; return self."""
        p = self.problems()
        if p:
            raise ValueError("invalid hf_export config:\n  - " + "\n  - ".join(p))
        if self.enabled and self.dirpath is not None:
            note_symlinked_dirpath(self.dirpath)
        return self

    @property
    def has_trigger(self) -> bool:
        return bool(self.on_checkpoint_save or self.every_n_train_steps or self.at_train_end)

    def to_manifest(self) -> dict:
        """JSON-able copy for the export manifest (tokenizer objects become their class name)."""
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "tokenizer" and v is not None and not isinstance(v, (str, Path)):
                v = type(v).__name__
            elif isinstance(v, Path):
                v = str(v)
            elif f.name == "hf_config_overrides":
                v = _to_plain_dict(v)
            d[f.name] = v
        return d


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def size_value(v):
    """``max_shard_size`` as the size parser takes it: digits become an int."""
    s = str(v).strip()
    return int(s) if s.isdigit() else s


# Checks of an ExportConfig that need knowledge from below the schema (the exporter's
# architectures, dtypes and size syntax).  The schema imports nothing from the exporter;
# the package registers them (``nemo_export_hooks/__init__.py``, from
# :mod:`nemo_export_hooks.config_checks`), so every import of the package has them.
_CHECKS: list = []


def add_check(check) -> None:
    """Register ``check(config) -> list[str]`` (problems), run by
    :meth:`ExportConfig.problems` for an enabled config; registering twice is a no-op."""
    if check not in _CHECKS:
        _CHECKS.append(check)


BOOL_OPTIONS = ("enabled", "on_checkpoint_save", "at_train_end", "async_write", "update_latest", "fail_on_error", "log_metrics")
_TRUE_WORDS = ("true", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "no", "n", "off", "0")


def parse_bool(name: str, value: Any) -> Any:
    """``value`` of boolean option ``name`` as OmegaConf reads it (``"false"``, ``"no"``,
    ``"off"``, ``"0"``, ``0`` are ``False``; ``"true"``, ``"yes"``, ``"on"``, ``"1"``, ``1`` are
    ``True``); raise naming the option for any other string; other values are returned as
    they are (:meth:`ExportConfig.problems` refuses a non-bool)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        w = value.strip().lower()
        if w in _TRUE_WORDS:
            return True
        if w in _FALSE_WORDS:
            return False
        raise ValueError(f"hf_export.{name} must be true or false, got {value!r}")
    return value


def _tokenizer_saver(tok: Any):
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


# -- OmegaConf helpers --------------------------------------------------------------------
def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:  # pragma: no cover - omegaconf is an optional extra
        return False
    return True


def _is_opaque(obj: Any) -> bool:
    """A value OmegaConf cannot hold (a tokenizer object)."""
    return obj is not None and not isinstance(obj, (str, int, float, bool, Path))


def _to_plain_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if _has_omegaconf():
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, ExportConfig):
        return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): (_to_plain_dict(v) if isinstance(v, Mapping) or _is_dictconfig(v) else v) for k, v in cfg.items()}
    raise TypeError(f"cannot read an hf_export config from {type(cfg).__name__}")


def _is_dictconfig(v: Any) -> bool:
    if not _has_omegaconf():
        return False
    from omegaconf import DictConfig

    return isinstance(v, DictConfig)
