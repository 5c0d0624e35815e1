"""``ExportConfig``: what :class:`~nemo_export_hooks.callback.HFExportCallback` exports, when,
and where.  A plain dataclass that is also an OmegaConf structured config, so the same
schema serves Python code, YAML (``nemo_export_hooks/conf/hf_export/*.yaml``) and Hydra command lines
(``hf_export.enabled=true hf_export.keep_last_k=3``).

Everything that can be checked without a trainer is checked by :meth:`ExportConfig.validate`
(called by the callback's constructor and again at ``setup``): a run must not fail at step
10,000 for something knowable at step 0.

Where exports go (``placement``, ``dirpath``, ``filename``)
-----------------------------------------------------------
The rules are :class:`nemo_export_hooks.placement.Placement`'s; what the options mean:

``placement`` is one of ``auto``, ``sibling``, ``subdir``, ``inside``.

* ``sibling``: an export sits beside the training checkpoint it belongs to and is named
  after it, with the ``-hf`` suffix.
* ``subdir``: one level down instead, ``<checkpoint dir>/hf/<name>``.
* ``inside``: in the checkpoint directory itself, ``<checkpoint>/hf`` (Megatron-Bridge only:
  its ``iter_N`` directories; deleted with the checkpoint by Bridge's rotation).
* ``auto`` (the default) **depends on the adapter**:

  - Lightning / NeMo 2 (``HFExportCallback``): ``subdir`` when the trainer's checkpoint
    callback is NeMo's ``ModelCheckpoint`` and ``sibling`` otherwise, because NeMo's resume
    logic (``nemo_topk_check_previous_run``) treats *every* directory beside its checkpoints
    as a checkpoint, parses its monitor value from the name, and may delete real
    checkpoints to enforce ``save_top_k``; a ``<name>-hf`` sibling would be counted as one.
    ``inside`` is refused.
  - Megatron-Bridge (``HFExportBridgeCallback``): ``inside``, ``iter_N/hf``.

=====================================  ==========================================
training checkpoint (Lightning)        Hugging Face export (``sibling``)
=====================================  ==========================================
``.../checkpoints/epoch=0-step=10.ckpt``   ``.../checkpoints/epoch=0-step=10-hf``
``.../checkpoints/<name>`` (directory)     ``.../checkpoints/<name>-hf``
no checkpoint (``every_n_train_steps``,    ``<trainer checkpoint dir>/step=<step>-hf``
``at_train_end``)
=====================================  ==========================================

With Megatron-Bridge an export that belongs to no checkpoint goes to
``<checkpoint.save>/hf/iter_<step, 7 digits>`` whatever the placement.

``dirpath`` (a directory) overrides the placement: every export goes there, named by
``filename``.  ``filename`` is a template with the fields ``{checkpoint}`` (the checkpoint's
name without ``.ckpt``; ``step=<step>`` for exports that belong to no checkpoint;
``iter_<step, 7 digits>`` with Megatron-Bridge), ``{step}`` and ``{epoch}`` (format specs
allowed: ``hf-{step:07d}``).  Its default is ``{checkpoint}-hf`` beside checkpoints, ``hf``
inside one and ``{checkpoint}`` elsewhere.  A filename must be one path component: absolute
paths, ``..``, separators, hidden names and the reserved ``latest`` / ``latest.txt`` are
rejected.
"""

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .placement import (  # noqa: F401  (path policy lives in placement; names kept here for old imports)
    HF_SUBDIR,
    HF_SUFFIX,
    PLACEMENTS,
    TEMPLATE_FIELDS,
    TOKENIZER_FILES,
    check_filename_template,
    name_max,
    note_symlinked_dirpath,
    render_filename,
    tokenizer_saver,
)

_tokenizer_saver = tokenizer_saver  # the old private name (the adapters imported it from here)

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

ON_BUSY = ("skip", "wait")


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
        for check in _CHECKS:  # what only the exporter knows (arch, dtype, sizes, formats): see add_check
            p.extend(check(self))
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
            elif not any((d / n).is_file() for n in TOKENIZER_FILES):
                p.append(f"tokenizer directory {str(tok)!r} has none of {', '.join(TOKENIZER_FILES)}")
        elif tok is not None and not isinstance(tok, (str, Path)) and tokenizer_saver(tok) is None:
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
