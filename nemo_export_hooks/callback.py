"""``HFExportCallback``: publish a Hugging Face checkpoint next to every training checkpoint.

The callback only decides *whether*, *when* and *where*; the exporter
(:func:`~nemo_export_hooks.exporter.api.prepare_export` / ``write_prepared``) does the rest.

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
    A step is exported at most once.

Async mechanism (``async_write=True``)
    On the training thread, every rank plans the export (cheap; a collective only for a
    quantized model, whose formats are agreed on), takes part in the tensor-parallel gathers
    and copies what it owns to host memory (``PreparedExport.host_snapshot``; the owner of a
    TP group holds the gathered tensors of its share until they are written); the ranks
    agree that all snapshots worked; then a
    single background thread per rank writes the shards, rank 0 commits and publishes the
    directory atomically, updates ``latest`` and applies ``keep_last_k``.  With several
    ranks the background writes talk over a gloo group of their own (created at setup), and
    the training thread agrees on "finished everywhere" over a second gloo group, so no
    background collective ever interleaves with training's.  Results are collected on the
    training thread (batch ends, ``on_train_end``, ``teardown``): the log line, the
    ``hf_export/*`` metrics, ``fail_on_error``.  ``on_train_end``, ``teardown`` and
    ``on_exception`` wait for an export in flight; a failed or interrupted export never
    publishes anything (the writer's staging directory is removed, and at the next setup
    stale staging directories of a crashed run are cleaned).

Resume
    ``state_dict`` (saved inside every training checkpoint) holds the steps already
    exported, the exports this callback made (for ``keep_last_k``), and the exports that
    were planned or in flight when the checkpoint was written.  After a restart, at
    ``on_train_start``, each of those is checked on disk (a published export with our
    manifest and the same step counts as done); one that is missing and belongs to the
    step training resumes from is exported again from the restored weights; the others are
    reported as lost.  No step is exported twice.

Validation at setup (``setup`` / ``on_fit_start``, before step 0)
    the config (arch, dtype, templates, sizes, tokenizer directory), the model structure
    (``prepare_export`` once, with the full Hugging Face key check; ``expect_quant``), and
    that every export directory is writable, local and not inside a training checkpoint.

What an export may replace
    Only an export this callback made itself (``owned``: this run's exports, and after a
    resume those recorded in the training checkpoint).  An existing directory under the
    export's name that is not ours (an earlier run's export sharing ``dirpath`` and names, a
    user's directory, a symlink) is refused before anything is written: the export counts
    as failed (``fail_on_error`` decides whether training goes on).  An export directory
    inside a training checkpoint (NeMo/Lightning may delete or rotate that checkpoint, and
    the export would change it) is refused at setup when it is already there, and checked
    again before every export.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - lightning is an optional extra
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]

from .config import HF_SUBDIR, HF_SUFFIX, ExportConfig, _tokenizer_saver, render_filename

__all__ = ["HFExportCallback", "callbacks_from_cfg", "ExportConfig", "ExportRefusedError"]

log = logging.getLogger("nemo_export_hooks")

_STATE_VERSION = 1
_HOOK_ATTR = "_nemo_export_hooks_save_hook"


# -- requests and jobs --------------------------------------------------------------------
@dataclass
class _Request:
    step: int
    epoch: int
    path: Path
    trigger: str  # checkpoint | every_n_train_steps | train_end | resume
    checkpoint: Optional[str] = None

    def record(self, status: str) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "path": str(self.path),
            "trigger": self.trigger,
            "checkpoint": self.checkpoint,
            "status": status,
        }


@dataclass
class _Job:
    req: _Request
    t0: float
    blocking_s: float = 0.0
    future: Optional[Future] = None
    result: Any = None
    error: Optional[BaseException] = None
    removed: list = field(default_factory=list)


# -- the save_checkpoint wrapper ----------------------------------------------------------
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
                cb._pending_save = None
            raise
        for cb, tok in tokens:
            cb._after_checkpoint_save(self.trainer, filepath, tok)
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


# -- the callback -------------------------------------------------------------------------
class HFExportCallback(Callback):
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
        # runtime state
        self.exports: list[dict] = []
        self.failed = 0
        self.skipped = 0
        self._done_steps: set[int] = set()
        self._owned: list[str] = []
        self._inflight: Optional[_Job] = None
        self._pending_save: Optional[_Request] = None
        self._due: Optional[tuple[int, str]] = None
        self._resume_pending: list[dict] = []
        self._active = False
        self._model_ok = False
        self._tokenizer: Any = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._write_group = None
        self._ctl_group = None
        self._world = 1
        self._rank = 0
        self._last_trigger_step = -1

    _RUNTIME = ("_executor", "_write_group", "_ctl_group", "_inflight", "_pending_save")

    def __getstate__(self) -> dict:
        # NeMo's Trainer deep-copies its callbacks (IOMixin); threads, process groups and an
        # export in flight belong to one run and are never copied.
        state = dict(self.__dict__)
        for k in self._RUNTIME:
            state[k] = None
        return state

    # -- identity / state -----------------------------------------------------------------
    @property
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(arch=c.arch, dtype=c.dtype, dirpath=c.dirpath, filename=c.filename, placement=c.placement)

    def state_dict(self) -> dict:
        pending = []
        job = self._inflight
        if job is not None:
            pending.append(job.req.record("inflight"))
        if self._pending_save is not None:
            pending.append(self._pending_save.record("pending"))
        return {
            "version": _STATE_VERSION,
            "exported_steps": sorted(self._done_steps),
            "owned": list(self._owned),
            "pending": pending,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, Mapping) or state_dict.get("version") != _STATE_VERSION:
            log.warning("hf_export: ignoring callback state of unknown format in the checkpoint")
            return
        self._done_steps = {int(s) for s in state_dict.get("exported_steps", [])}
        self._owned = [str(p) for p in state_dict.get("owned", [])]
        self._resume_pending = [dict(r) for r in state_dict.get("pending", [])]

    # -- setup ----------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or not self.config.enabled:
            return
        cfg = self.config.validate()
        if not cfg.has_trigger:
            log.warning("hf_export is enabled but every trigger is off (on_checkpoint_save, every_n_train_steps, at_train_end): nothing will be exported")
        tok = cfg.tokenizer
        if isinstance(tok, (str, Path)):
            self._tokenizer = None if str(tok) == "auto" else str(Path(tok).expanduser())
        else:
            self._tokenizer = tok
        if cfg.dirpath is not None:
            # before anything else touches the directory: refused at step 0, not at step N
            _refuse_inside_checkpoint(Path(cfg.dirpath).expanduser())
            _check_writable(Path(cfg.dirpath).expanduser())
        self._init_dist()
        # The model may not exist yet (NeMo builds it in configure_model): then on_fit_start.
        self._validate_model(trainer, pl_module, allow_defer=True)
        _SaveHook.attach(trainer, self)
        if self._executor is None and cfg.async_write:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-export", initializer=_lower_thread_priority)
        self._active = True

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        cfg = self.config
        self._init_dist()
        if not self._model_ok:
            self._validate_model(trainer, pl_module, allow_defer=False)
        if isinstance(cfg.tokenizer, str) and cfg.tokenizer == "auto":
            self._tokenizer = _find_tokenizer(trainer, pl_module)
            if self._tokenizer is None:
                log.info("hf_export: tokenizer='auto' found no tokenizer with save_pretrained; exports will have none")
        # every directory exports may go to: writable, local, not inside a training
        # checkpoint; stale staging cleaned
        dirs = self._export_dirs(trainer)
        for d in dirs:
            if "://" in str(d):
                raise ValueError(
                    f"hf_export: checkpoints go to {d}, which is not a filesystem path; set hf_export.dirpath to a (shared) directory"
                )
            _refuse_inside_checkpoint(d)
            _check_writable(d)
        if trainer.is_global_zero:
            from .publish import clean_stale_staging

            for d in dirs:
                for p in clean_stale_staging(d):
                    log.info("hf_export: removed a crashed run's staging directory %s", p)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        self._last_trigger_step = trainer.global_step
        # Steps beyond the one training starts from belong to a discarded future (a fresh
        # run with a reused callback, or a resume from an older checkpoint): export them anew.
        self._done_steps = {s for s in self._done_steps if s <= trainer.global_step}
        if self._resume_pending:
            self._resolve_resumed(trainer)

    # -- triggers -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._active and self._due is not None:
            self._flush_due(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        self._poll(trainer)
        n = self.config.every_n_train_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._last_trigger_step:
            self._last_trigger_step = step
            if not self._is_claimed(step):
                self._due = (step, "every_n_train_steps")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        if self._due is not None:
            self._flush_due(trainer)
        if self.config.at_train_end and not self._is_claimed(trainer.global_step):
            self._export_now(trainer, "train_end", must=True)
        self._poll(trainer, wait=True)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not self._active:
            return
        try:
            self._poll(trainer, wait=True, raise_errors=False)
        finally:
            self._shutdown(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not self._active:
            return
        try:
            self._poll(trainer, wait=True)
        finally:
            self._shutdown(trainer)

    # -- checkpoint saves (called by _SaveHook on every rank) -------------------------------
    def _before_checkpoint_save(self, trainer, filepath) -> Optional[_Request]:
        self._pending_save = None
        if not self._active or not self.config.on_checkpoint_save:
            return None
        step, epoch = trainer.global_step, trainer.current_epoch
        if self._is_claimed(step):
            log.debug("hf_export: step %d is already exported; checkpoint %s adds no export", step, filepath)
            return None
        try:
            req = _Request(step, epoch, self._target(trainer, step, epoch, filepath), "checkpoint", str(filepath))
        except Exception as e:
            self._handle_error(trainer, step, None, e)
            return None
        if not self._make_room(trainer, step, must=False):
            return None
        self._pending_save = req  # state_dict() (called inside the save) records it
        return req

    def _after_checkpoint_save(self, trainer, filepath, req: Optional[_Request]) -> None:
        self._pending_save = None
        if req is not None:
            self._start(trainer, req)

    # -- export machinery -----------------------------------------------------------------
    def _is_claimed(self, step: int) -> bool:
        job = self._inflight
        return step in self._done_steps or (job is not None and job.req.step == step)

    def _flush_due(self, trainer) -> None:
        step, trigger = self._due  # type: ignore[misc]
        self._due = None
        if step != trainer.global_step or self._is_claimed(step):
            return
        self._export_now(trainer, trigger)

    def _export_now(self, trainer, trigger: str, must: bool = False, path: Optional[Path] = None, checkpoint: Optional[str] = None) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        try:
            target = path if path is not None else self._target(trainer, step, epoch, None)
        except Exception as e:
            self._handle_error(trainer, step, None, e)
            return
        if not self._make_room(trainer, step, must=must):
            return
        self._start(trainer, _Request(step, epoch, target, trigger, checkpoint))

    def _make_room(self, trainer, step: int, must: bool) -> bool:
        """Collect a finished export; if one is still in flight, wait or skip."""
        self._poll(trainer)
        if self._inflight is None:
            return True
        if must or self.config.on_busy == "wait":
            busy = self._inflight.req.step
            t = time.perf_counter()
            self._poll(trainer, wait=True)
            log.info("hf_export: waited %.2f s for the export of step %d before exporting step %d", time.perf_counter() - t, busy, step)
            return True
        self.skipped += 1
        log.warning(
            "hf_export: skipped the export of step %d: the export of step %d is still being written "
            "(on_busy=skip; set on_busy=wait to wait for it instead)",
            step,
            self._inflight.req.step,
        )
        self._log_metrics(trainer, {"hf_export/skipped": float(self.skipped)})
        return False

    def _start(self, trainer, req: _Request) -> None:
        """Plan + host copy on the training thread; write in the background (or here)."""
        from .exporter.api import prepare_export

        cfg = self.config
        t0 = time.perf_counter()
        err: Optional[BaseException] = None
        prepared = tensors = None
        owned = list(self._owned)  # every earlier export was collected (_make_room) before this
        # Refusals (the target is someone else's, or inside a training checkpoint) are decided
        # by rank 0, which publishes, before the plan and the host copy: nothing is gathered,
        # copied or written for an export that cannot be published.  All ranks must agree
        # before the (collective) gathers start, hence the all_ok on the control group.
        if self._rank == 0:
            try:
                _check_target(req, owned)
            except Exception as e:
                err = e
        err = self._agree(err)
        if err is None:  # not refused (the same outcome on every rank after the agreement)
            try:
                prepared = prepare_export(self._model(trainer), cfg.arch, cfg.dtype, dict(cfg.hf_config_overrides), check_hf_keys=False)
                tensors = prepared.host_snapshot() if cfg.async_write else prepared.tensors()
            except Exception as e:
                err = e
            err = self._agree(err)
        job = _Job(req, t0)
        if err is not None:
            tensors = None
            job.error = err
            job.blocking_s = time.perf_counter() - t0
            self._finish(trainer, job)
            return
        manifest = self._manifest(trainer, req)
        if cfg.async_write:
            job.blocking_s = time.perf_counter() - t0
            self._inflight = job
            job.future = self._executor.submit(self._write, job, prepared, tensors, manifest, owned)  # type: ignore[union-attr]
        else:
            self._write(job, prepared, tensors, manifest, owned)
            job.blocking_s = time.perf_counter() - t0
            self._finish(trainer, job)

    def _write(self, job: _Job, prepared, tensors, manifest: dict, owned: list) -> _Job:
        """Write, commit, publish, then (rank 0) ``latest`` and retention.  Never raises."""
        from .exporter.api import write_prepared

        cfg = self.config
        req = job.req
        try:
            job.result = write_prepared(
                prepared,
                tensors,
                req.path,
                tokenizer=self._tokenizer,
                max_shard_size=_size(cfg.max_shard_size),
                # Replace only an export this callback made (_check_target refused the rest;
                # this closes the race with another run creating the directory meanwhile).
                # Publish also checks the manifest: never a directory that is not an export.
                overwrite=str(req.path) in owned,
                manifest_extra=manifest,
                t0=job.t0,
                group=self._write_group,
                log_level=logging.DEBUG,  # the callback logs its own line, with the step
            )
        except BaseException as e:  # noqa: BLE001 - reported on the training thread
            job.error = e
            if self._rank == 0:
                _remove_staging_of(req.path)
            return job
        finally:
            tensors = None  # drop the host copy as soon as it is written
        if self._rank == 0:
            from .publish import apply_retention, update_latest

            if cfg.update_latest:
                try:
                    update_latest(req.path.parent, req.path)
                except Exception as e:  # the export itself is good
                    log.warning("hf_export: could not update the latest pointer in %s: %s", req.path.parent, e)
            if cfg.keep_last_k:
                owned = [p for p in owned if p != str(req.path)] + [str(req.path)]
                try:
                    job.removed = [str(p) for p in apply_retention(owned, cfg.keep_last_k)]
                except Exception as e:
                    log.warning("hf_export: retention (keep_last_k=%s) failed: %s", cfg.keep_last_k, e)
        return job

    def _poll(self, trainer, wait: bool = False, raise_errors: bool = True) -> None:
        """Collect the export in flight if it finished on every rank (or wait for it)."""
        job = self._inflight
        if job is None or job.future is None:
            return
        if wait:
            try:
                job.future.result()
            except BaseException as e:  # _write never raises; this is an executor failure
                job.error = job.error or e
        done = job.future.done()
        if self._world > 1:
            done = self._all_true(done)
        if not done:
            return
        self._inflight = None
        self._finish(trainer, job, raise_errors=raise_errors)

    def _finish(self, trainer, job: _Job, raise_errors: bool = True) -> None:
        """On the training thread: record, log, metrics, fail_on_error."""
        req = job.req
        if job.error is not None:
            self._handle_error(trainer, req.step, req.path, job.error, raise_errors=raise_errors)
            return
        res = job.result
        self._done_steps.add(req.step)
        removed = set(job.removed)
        self._owned = [p for p in self._owned if p not in removed and p != str(req.path)] + [str(req.path)]
        info = {
            "step": req.step,
            "epoch": req.epoch,
            "trigger": req.trigger,
            "path": str(req.path),
            "checkpoint": req.checkpoint,
            "bytes": int(res.total_bytes),
            "num_tensors": int(res.num_tensors),
            "seconds": float(res.seconds),
            "blocking_seconds": float(job.blocking_s),
            "removed": sorted(removed),
        }
        self.exports.append(info)
        if self._rank == 0:
            gb = res.total_bytes / 1e9
            log.info(
                "hf_export: step %d -> %s: %.3f GB in %.2f s (%.2f GB/s); training waited %.2f s",
                req.step,
                req.path,
                gb,
                res.seconds,
                res.gb_per_s,
                job.blocking_s,
            )
            for p in sorted(removed):
                log.info("hf_export: keep_last_k=%s removed %s", self.config.keep_last_k, p)
        self._log_metrics(
            trainer,
            {
                "hf_export/step": float(req.step),
                "hf_export/gb": res.total_bytes / 1e9,
                "hf_export/seconds": float(res.seconds),
                "hf_export/gb_per_s": float(res.gb_per_s),
                "hf_export/blocking_seconds": float(job.blocking_s),
                "hf_export/count": float(len(self.exports)),
            },
        )

    def _handle_error(self, trainer, step: int, path: Optional[Path], error: BaseException, raise_errors: bool = True) -> None:
        self.failed += 1
        where = f" to {path}" if path is not None else ""
        msg = f"HF export of step {step}{where} failed: {type(error).__name__}: {error}"
        if path is not None and self._rank == 0 and not isinstance(error, ExportRefusedError):
            # A refused export wrote nothing; the staging directories of that name may belong
            # to another run's export in flight (a second run sharing dirpath): leave them.
            _remove_staging_of(path)
        self._log_metrics(trainer, {"hf_export/failed": float(self.failed)})
        if self.config.fail_on_error and raise_errors:
            raise RuntimeError(msg + " (hf_export.fail_on_error=true)") from error
        log.error("hf_export: %s; training continues (hf_export.fail_on_error=false)", msg, exc_info=error)

    def _resolve_resumed(self, trainer) -> None:
        """Exports that were planned or in flight when the resumed checkpoint was written."""
        from .exporter import parallel
        from .publish import read_manifest

        pending, self._resume_pending = self._resume_pending, []
        decisions = []
        if self._rank == 0:
            for rec in pending:
                step, path = int(rec["step"]), Path(rec["path"])
                m = read_manifest(path)
                if step in self._done_steps:
                    decisions.append("done")
                elif m is not None and m.get("step") == step and (m.get("producer") or {}).get("name") == "nemo-export-hooks":
                    decisions.append("found")
                elif step == trainer.global_step:
                    decisions.append("redo")
                else:
                    decisions.append("lost")
        if self._world > 1:
            decisions = parallel.broadcast_object(decisions, group=self._ctl_group)
        for rec, what in zip(pending, decisions):
            step, path = int(rec["step"]), str(rec["path"])
            if what == "found":
                self._done_steps.add(step)
                self._owned = [p for p in self._owned if p != path] + [path]
                if self._rank == 0:
                    log.info("hf_export: resume: the export of step %d (%s) completed before the restart", step, path)
            elif what == "redo":
                if self._rank == 0:
                    log.info("hf_export: resume: the export of step %d was not completed before the restart; exporting it again from the restored weights", step)
                self._export_now(trainer, "resume", must=True, path=Path(path), checkpoint=rec.get("checkpoint"))
            elif what == "lost" and self._rank == 0:
                log.warning("hf_export: resume: the export of step %d (%s) was not completed before the restart and its weights are gone", step, path)

    # -- helpers --------------------------------------------------------------------------
    def _model(self, trainer):
        model = trainer.model if trainer.model is not None else trainer.lightning_module
        return model

    def _validate_model(self, trainer, pl_module, allow_defer: bool) -> None:
        from .exporter.api import prepare_export
        from .exporter.source import unwrap_model

        cfg = self.config
        model = trainer.model if trainer.model is not None else pl_module
        try:
            unwrap_model(model)
        except TypeError:
            if allow_defer:
                return
            raise
        prepared = prepare_export(model, cfg.arch, cfg.dtype, dict(cfg.hf_config_overrides), check_hf_keys=True)
        if cfg.expect_quant:
            got = (prepared.quant_algo or "none").upper()
            if got != str(cfg.expect_quant).upper():
                raise ValueError(
                    f"hf_export.expect_quant={cfg.expect_quant!r} but the model's quantizers give {got!r} "
                    "(quantize the model with ModelOpt before training, or change expect_quant)"
                )
        self._model_ok = True

    def _init_dist(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self._world, self._rank = dist.get_world_size(), dist.get_rank()
        if self._world > 1 and self._write_group is None:
            # Background writes and the training thread's agreements each get a gloo group of
            # their own: collectives of two threads must never share a group.
            self._write_group = dist.new_group(backend="gloo")
            self._ctl_group = dist.new_group(backend="gloo")

    def _agree(self, err: Optional[BaseException]) -> Optional[BaseException]:
        """With several ranks, every rank learns whether any rank failed (``all_ok`` on the
        control group, naming the failing rank): returns this rank's error, or the error that
        names another rank's failure, or ``None`` when every rank succeeded."""
        if self._world <= 1:
            return err
        from .exporter import parallel

        try:
            msg = f"rank {self._rank}: {type(err).__name__}: {err}" if err else ""
            parallel.all_ok(err is None, msg, group=self._ctl_group)
        except Exception as e:
            err = err or e
        return err

    def _all_true(self, flag: bool) -> bool:
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._ctl_group)
        return bool(t.item())

    def _placement(self, trainer) -> str:
        p = self.config.placement
        if p != "auto":
            return p
        for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
            if any(getattr(k, "__module__", "").startswith("nemo.") for k in type(cb).__mro__):
                return "subdir"  # NeMo's ModelCheckpoint or a subclass of it
        return "sibling"

    def _default_ckpt_dir(self, trainer) -> Path:
        cb = getattr(trainer, "checkpoint_callback", None)
        d = getattr(cb, "dirpath", None)
        if d:
            return Path(d)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _target(self, trainer, step: int, epoch: int, checkpoint) -> Path:
        cfg = self.config
        if checkpoint is not None:
            ck = Path(str(checkpoint))
            name = ck.name[: -len(".ckpt")] if ck.name.endswith(".ckpt") else ck.name
            ckpt_dir = ck.parent
        else:
            name = f"step={step}"
            ckpt_dir = self._default_ckpt_dir(trainer)
        if cfg.dirpath is not None:
            base, default_name = Path(cfg.dirpath).expanduser(), "{checkpoint}"
        elif self._placement(trainer) == "subdir":
            base, default_name = ckpt_dir / HF_SUBDIR, "{checkpoint}"
        else:
            base, default_name = ckpt_dir, "{checkpoint}" + HF_SUFFIX
        if "://" in str(base):
            raise ValueError(f"export directory {base} is not a filesystem path; set hf_export.dirpath")
        return base / render_filename(cfg.filename or default_name, checkpoint=name, step=step, epoch=epoch)

    def _export_dirs(self, trainer) -> list[Path]:
        cfg = self.config
        if cfg.dirpath is not None:
            return [Path(cfg.dirpath).expanduser()]
        sub = self._placement(trainer) == "subdir"
        dirs = []
        ckpt_dirs = [getattr(cb, "dirpath", None) for cb in getattr(trainer, "checkpoint_callbacks", []) or []]
        ckpt_dirs = [Path(str(d)) for d in ckpt_dirs if d] or [self._default_ckpt_dir(trainer)]
        if cfg.every_n_train_steps or cfg.at_train_end:
            ckpt_dirs.append(self._default_ckpt_dir(trainer))
        for d in ckpt_dirs:
            d = d / HF_SUBDIR if sub else d
            if d not in dirs:
                dirs.append(d)
        return dirs

    def _manifest(self, trainer, req: _Request) -> dict:
        m = {
            "step": req.step,
            "epoch": req.epoch,
            "trigger": req.trigger,
            "checkpoint": req.checkpoint,
            "hf_export_config": self.config.to_manifest(),
        }
        n = _consumed_samples(trainer, req.step)
        if n is not None:
            m["consumed_samples"] = n
        return m

    def _log_metrics(self, trainer, metrics: dict) -> None:
        if not self.config.log_metrics or self._rank != 0 or trainer is None:
            return
        for lg in getattr(trainer, "loggers", []) or []:
            try:
                lg.log_metrics(metrics, step=trainer.global_step)
                if hasattr(lg, "save"):
                    lg.save()
            except Exception as e:  # metrics must never break training
                log.debug("hf_export: logger %s refused metrics: %s", type(lg).__name__, e)

    def _shutdown(self, trainer) -> None:
        self._active = False
        self._due = None
        _SaveHook.detach(trainer, self)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# -- helpers ------------------------------------------------------------------------------
def callbacks_from_cfg(cfg: Any, key: str = "hf_export", tokenizer: Any = None) -> list:
    """The callbacks a recipe config asks for: ``[HFExportCallback]`` when
    ``cfg.hf_export.enabled`` (or ``cfg.enabled`` if ``cfg`` is the ``hf_export`` node
    itself), else ``[]``.  Validates the config either way when enabled."""
    node = cfg
    if cfg is not None and not _looks_like_export_node(cfg):
        node = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    if node is None:
        return []
    enabled = node.enabled if isinstance(node, ExportConfig) else bool(node.get("enabled", False)) if hasattr(node, "get") else False
    if not enabled:
        return []
    return [HFExportCallback(node, tokenizer=tokenizer)]


def _looks_like_export_node(cfg: Any) -> bool:
    if isinstance(cfg, ExportConfig):
        return True
    try:
        keys = set(cfg.keys())
    except Exception:
        return False
    return "arch" in keys or ("enabled" in keys and "on_checkpoint_save" in keys)


def _size(v):
    s = str(v).strip()
    return int(s) if s.isdigit() else s


def _check_writable(d: Path) -> None:
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


def _checkpoint_markers(d: Path) -> Optional[str]:
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


def _training_checkpoint_containing(d: Path, checkpoint: Optional[str] = None) -> Optional[tuple[Path, str]]:
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
        why = _checkpoint_markers(p)
        if why is not None:
            return p, why
    return None


def _lower_thread_priority(step: int = 10) -> None:
    """Run the background export thread at a lower CPU priority (nice +10) than training:
    where training keeps every core busy, the writer then takes what training leaves instead
    of slowing the steps after an export.  Linux applies nice per thread, and threads started
    from this one (the shard hashers) inherit it.  Elsewhere, or if refused, nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):  # pragma: no cover - not Linux / not permitted
        pass


def _refuse_inside_checkpoint(d: Path, checkpoint: Optional[str] = None) -> None:
    """Raise if export directory ``d`` is inside a training checkpoint.  Such an export
    would change the checkpoint, and the checkpoint manager (``save_top_k``, NeMo's
    rotation) deletes it with the checkpoint."""
    hit = _training_checkpoint_containing(d, checkpoint)
    if hit is not None:
        ck, why = hit
        raise ExportRefusedError(
            f"hf_export: export directory {d} is inside the training checkpoint {ck} ({why}); the checkpoint "
            "manager may delete or rotate it with the export, and the export would change the checkpoint: "
            "set hf_export.dirpath to a directory outside every training checkpoint"
        )


def _check_target(req: "_Request", owned: list) -> None:
    """Rank 0, before an export starts: refuse a target inside a training checkpoint, and an
    existing target this callback did not create (``owned``).  A second run sharing
    ``dirpath`` and names must not replace the first run's exports; an empty directory holds
    nothing to lose and is replaced as before."""
    path = Path(req.path)
    _refuse_inside_checkpoint(path.parent, req.checkpoint)
    if str(path) in owned or not os.path.lexists(path):
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


def _remove_staging_of(final: Path) -> None:
    """Remove staging leftovers of one export (its own hidden ``.{name}.staging-*``)."""
    from .publish import is_staging_name

    parent = Path(final).parent
    if not parent.is_dir():
        return
    prefix = f".{Path(final).name}.staging-"
    for p in parent.iterdir():
        if p.name.startswith(prefix) and is_staging_name(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _find_tokenizer(trainer, pl_module):
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        tok = getattr(owner, "tokenizer", None) if owner is not None else None
        saver = _tokenizer_saver(tok)
        if saver is not None:
            return saver
    return None


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
