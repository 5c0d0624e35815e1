"""``HFExportCallback``: the Lightning / NeMo 2 adapter of the export scheduler.

It translates Lightning's events into :class:`~nemo_export_hooks.scheduler.ExportScheduler`
calls and knows Lightning's (and NeMo's) specifics: where checkpoints go, how checkpoint
saves are seen, the callback state saved in every checkpoint, loggers, tokenizers.

Triggers
    * ``on_checkpoint_save``: every ``trainer.save_checkpoint(path)``: Lightning's or NeMo's
      ``ModelCheckpoint`` (sync or async save), or your own call.  Lightning has no hook
      that runs *after* a checkpoint is written *with its path* (``on_save_checkpoint`` runs
      before the write and gets no path), so at setup the callback wraps this trainer's
      ``save_checkpoint`` (the instance attribute only; several callbacks share one
      wrapper, and the original is restored at teardown).  The export starts right after
      the checkpoint call returns, on every rank, from the exact weights it saved.
    * ``every_n_train_steps``: due at the batch end of step N and taken at the start of the
      next batch (the weights are still those of step N); a checkpoint saved at step N in
      between takes it over, so the export is named after that checkpoint.
    * ``at_train_end``: the final weights, in ``on_train_end``.

Async writes, resume, refusals: see :mod:`nemo_export_hooks.scheduler` and
:mod:`nemo_export_hooks.store.commit`.  The scheduler's state (steps exported, exports made, the
run lineage's ``run_id``, exports pending at save time) is this callback's ``state_dict``,
saved inside every training checkpoint.

Validation at setup (``setup`` / ``on_fit_start``, before step 0): the config, the model
structure (a full plan with the Hugging Face key check; ``expect_quant``), and that every
export directory is writable, local and not inside a training checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..extras import lightning_pytorch

pl = lightning_pytorch("HFExportCallback (nemo_export_hooks.integrations.lightning)")
Callback = pl.Callback

from ..config import ExportConfig
from ..placement import LIGHTNING, Placement
from ..scheduler import ExportScheduler, Request, RunResults
from ..store.commit import ExportRefusedError, check_writable, refuse_inside_checkpoint
from . import export_node

__all__ = ["HFExportCallback", "callbacks_from_cfg", "ExportConfig", "ExportRefusedError"]

log = logging.getLogger("nemo_export_hooks")

_HOOK_ATTR = "_nemo_export_hooks_save_hook"


class _SaveHook:
    """Wraps one trainer's ``save_checkpoint`` and tells listeners before and after."""

    def __init__(self, trainer: "pl.Trainer"):
        self.trainer = trainer
        self.had_instance_attr = "save_checkpoint" in vars(trainer)
        self.previous = vars(trainer).get("save_checkpoint")
        self.call = trainer.save_checkpoint  # bound method (or an earlier instance wrapper)
        self.listeners: list["HFExportCallback"] = []

        def save_checkpoint(filepath, *args, **kwargs):
            return self(filepath, *args, **kwargs)

        save_checkpoint.__wrapped__ = self.call  # type: ignore[attr-defined]
        self.wrapper = save_checkpoint
        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        setattr(trainer, _HOOK_ATTR, self)

    def __call__(self, filepath, *args, **kwargs):
        tokens = [(cb, cb._before_checkpoint_save(self.trainer, filepath)) for cb in list(self.listeners)]
        try:
            out = self.call(filepath, *args, **kwargs)
        except BaseException:
            for cb, _ in tokens:
                cb.scheduler.checkpoint_failed()
            raise
        for cb, tok in tokens:
            cb.scheduler.checkpoint_saved(tok)
        return out

    @staticmethod
    def attach(trainer: "pl.Trainer", cb: "HFExportCallback") -> None:
        hook = getattr(trainer, _HOOK_ATTR, None)
        if not isinstance(hook, _SaveHook):
            hook = _SaveHook(trainer)
        if cb not in hook.listeners:
            hook.listeners.append(cb)

    @staticmethod
    def detach(trainer: "pl.Trainer", cb: "HFExportCallback") -> None:
        hook = getattr(trainer, _HOOK_ATTR, None)
        if not isinstance(hook, _SaveHook):
            return
        if cb in hook.listeners:
            hook.listeners.remove(cb)
        if hook.listeners:
            return
        if vars(trainer).get("save_checkpoint") is hook.wrapper:
            if hook.had_instance_attr:
                trainer.save_checkpoint = hook.previous  # type: ignore[method-assign]
            else:
                del trainer.save_checkpoint
        try:
            delattr(trainer, _HOOK_ATTR)
        except AttributeError:
            pass


class _LightningHost:
    """The scheduler's view of one Lightning trainer."""

    def __init__(self, cb: "HFExportCallback"):
        self.cb = cb
        self.trainer: Optional["pl.Trainer"] = None
        self.pl_module = None

    def model(self):
        t = self.trainer
        return t.model if t.model is not None else (t.lightning_module if t.lightning_module is not None else self.pl_module)

    def manifest_extra(self, req: Request) -> dict:
        n = _consumed_samples(self.trainer, req.step)
        return {} if n is None else {"consumed_samples": n}

    def log_metrics(self, metrics: dict) -> None:
        t = self.trainer
        for lg in getattr(t, "loggers", []) or []:
            try:
                lg.log_metrics(metrics, step=t.global_step)
                if hasattr(lg, "save"):
                    lg.save()
            except Exception as e:  # metrics must never break training
                log.debug("hf_export: logger %s refused metrics: %s", type(lg).__name__, e)


class HFExportCallback(RunResults, Callback):
    """Export a Hugging Face checkpoint for every training checkpoint (see the module doc).

    Args:
        config: an :class:`ExportConfig`, a mapping or an OmegaConf node (``hf_export``).
        tokenizer: a tokenizer object (anything with ``save_pretrained``, or NeMo's wrapper
            holding one as ``.tokenizer``); overrides ``config.tokenizer``.
        **overrides: any ``ExportConfig`` field, e.g. ``arch="qwen3_moe"``.

    Example::

        trainer = Trainer(callbacks=[HFExportCallback(arch="qwen3_moe"), ModelCheckpoint(...)])

    After ``fit``, ``exports`` lists what was exported (step, path, bytes, seconds,
    seconds the training thread was blocked), ``failed`` and ``skipped`` count the rest.
    """

    def __init__(self, config: Any = None, *, tokenizer: Any = None, **overrides):
        super().__init__()
        if tokenizer is not None:
            overrides["tokenizer"] = tokenizer
        self.config = ExportConfig.from_any(config, **overrides).validate()
        self.placement = Placement(self.config, LIGHTNING)  # refuses placement="inside"
        self._host = _LightningHost(self)
        self.scheduler = ExportScheduler(self.config, self._host)

    # NeMo's Trainer deep-copies its callbacks (IOMixin): the scheduler's own __getstate__
    # leaves its runtime (threads, process groups, an export in flight) out of any copy.

    # -- identity / state -----------------------------------------------------------------
    @property
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(arch=c.arch, dtype=c.dtype, dirpath=c.dirpath, filename=c.filename, placement=c.placement)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.load_state_dict(state_dict)

    # -- setup ----------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or not self.config.enabled:
            return
        cfg = self.config.validate()
        self._host.trainer, self._host.pl_module = trainer, pl_module
        if not cfg.has_trigger:
            log.warning("hf_export is enabled but every trigger is off (on_checkpoint_save, every_n_train_steps, at_train_end): nothing will be exported")
        self.scheduler.tokenizer = self.placement.tokenizer()  # "auto": looked up at on_fit_start
        if cfg.dirpath is not None:
            # before anything else touches the directory: refused at step 0, not at step N
            refuse_inside_checkpoint(Path(cfg.dirpath).expanduser())
            check_writable(Path(cfg.dirpath).expanduser())
        self.scheduler.start_up()
        # The model may not exist yet (NeMo builds it in configure_model): then on_fit_start.
        self._validate_model(trainer, pl_module, allow_defer=True)
        _SaveHook.attach(trainer, self)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.scheduler.active:
            return
        cfg = self.config
        self._host.trainer, self._host.pl_module = trainer, pl_module
        if not self.scheduler.model_ok:
            self._validate_model(trainer, pl_module, allow_defer=False)
        if isinstance(cfg.tokenizer, str) and cfg.tokenizer == "auto":
            self.scheduler.tokenizer = self.placement.tokenizer(found=_tokenizers_held(trainer, pl_module))
            if self.scheduler.tokenizer is None:
                log.info("hf_export: tokenizer='auto' found no tokenizer with save_pretrained; exports will have none")
        # every directory exports may go to: writable, local, not inside a training
        # checkpoint; stale staging cleaned
        dirs = self._export_dirs(trainer)
        for d in dirs:
            if "://" in str(d):
                raise ValueError(
                    f"hf_export: checkpoints go to {d}, which is not a filesystem path; set hf_export.dirpath to a (shared) directory"
                )
            refuse_inside_checkpoint(d)
            check_writable(d)
        if trainer.is_global_zero:
            from ..store.commit import clean_stale_staging

            for d in dirs:
                for p in clean_stale_staging(d):
                    log.info("hf_export: removed a crashed run's staging directory %s", p)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.scheduler.active:
            return
        self.scheduler.train_starts_at(trainer.global_step, lambda rec: Path(rec["path"]))

    # -- triggers -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.scheduler.take_due(trainer.global_step, trainer.current_epoch, lambda: self._target(trainer, trainer.global_step, trainer.current_epoch, None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.scheduler.step_ended(trainer.global_step)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        self.scheduler.train_ended(step, epoch, lambda: self._target(trainer, step, epoch, None))

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not self.scheduler.active:
            return
        try:
            self.scheduler.poll(wait=True, raise_errors=False)
        finally:
            self._shutdown(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not self.scheduler.active:
            return
        try:
            self.scheduler.poll(wait=True)
        finally:
            self._shutdown(trainer)

    def _before_checkpoint_save(self, trainer, filepath) -> Optional[Request]:
        """Called by ``_SaveHook`` on every rank before the checkpoint is written."""
        if not self.scheduler.active:
            self.scheduler.checkpoint_failed()  # nothing pending
            return None
        step, epoch = trainer.global_step, trainer.current_epoch
        return self.scheduler.checkpoint_starting(step, epoch, lambda: self._target(trainer, step, epoch, filepath), filepath)

    # -- Lightning specifics --------------------------------------------------------------
    def _validate_model(self, trainer, pl_module, allow_defer: bool) -> None:
        from ..exporter.source import unwrap_model

        model = trainer.model if trainer.model is not None else pl_module
        try:
            unwrap_model(model)
        except TypeError:
            if allow_defer:
                return
            raise
        self.scheduler.validate_model(model)

    def _placement(self, trainer) -> str:
        return self.placement.mode(nemo_checkpointing=_nemo_checkpointing(trainer))

    def _default_ckpt_dir(self, trainer) -> Path:
        cb = getattr(trainer, "checkpoint_callback", None)
        d = getattr(cb, "dirpath", None)
        if d:
            return Path(d)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _target(self, trainer, step: int, epoch: int, checkpoint) -> Path:
        if checkpoint is not None:
            ck = Path(str(checkpoint))
            name = ck.name[: -len(".ckpt")] if ck.name.endswith(".ckpt") else ck.name
            ckpt_dir = ck.parent
        else:
            name = f"step={step}"
            ckpt_dir = self._default_ckpt_dir(trainer)
        return self.placement.target(name, step, epoch, checkpoint, ckpt_dir, mode=self._placement(trainer))

    def _export_dirs(self, trainer) -> list[Path]:
        ckpt_dirs = [getattr(cb, "dirpath", None) for cb in getattr(trainer, "checkpoint_callbacks", []) or []]
        ckpt_dirs = [Path(str(d)) for d in ckpt_dirs if d] or [self._default_ckpt_dir(trainer)]
        return self.placement.export_dirs(ckpt_dirs, self._default_ckpt_dir(trainer), mode=self._placement(trainer))

    def _shutdown(self, trainer) -> None:
        _SaveHook.detach(trainer, self)
        self.scheduler.shutdown()


def callbacks_from_cfg(cfg: Any, key: str = "hf_export", tokenizer: Any = None) -> list:
    """The callbacks a recipe config asks for: ``[HFExportCallback]`` when
    ``cfg.hf_export.enabled`` (or ``cfg.enabled`` if ``cfg`` is the ``hf_export`` node
    itself), else ``[]``.  Validates the config either way when enabled."""
    node = export_node(cfg, key)
    return [HFExportCallback(node, tokenizer=tokenizer)] if node is not None else []


def _tokenizers_held(trainer, pl_module) -> list:
    """The tokenizers the LightningModule and the datamodule hold, in that order (what
    ``tokenizer="auto"`` looks through)."""
    return [getattr(owner, "tokenizer", None) for owner in (pl_module, getattr(trainer, "datamodule", None)) if owner is not None]


def _nemo_checkpointing(trainer) -> bool:
    """The trainer saves with NeMo's ``ModelCheckpoint`` (or a subclass of it)."""
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        if any(getattr(k, "__module__", "").startswith("nemo.") for k in type(cb).__mro__):
            return True
    return False


def _consumed_samples(trainer, step: int) -> Optional[int]:
    """Global samples consumed up to ``step``, if the data pipeline tells (NeMo's sampler, or
    a plain DataLoader with a fixed batch size)."""
    for owner in (getattr(trainer, "strategy", None), getattr(trainer, "datamodule", None)):
        sampler = getattr(owner, "data_sampler", None) if owner is not None else None
        if sampler is not None and hasattr(sampler, "compute_consumed_samples"):
            try:
                return int(sampler.compute_consumed_samples(step - int(getattr(sampler, "init_global_step", 0))))
            except Exception:
                return None
    try:
        dl = trainer.train_dataloader
        bs = getattr(dl, "batch_size", None)
        if not isinstance(bs, int):
            return None
        dp = trainer.world_size
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                dp = ps.get_data_parallel_world_size()
        except Exception:
            pass
        return int(step) * int(trainer.accumulate_grad_batches) * bs * int(dp)
    except Exception:
        return None
