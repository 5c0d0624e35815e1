"""The trigger and scheduling core shared by every framework's training hook.

It knows no framework.  An adapter (the Lightning callback, the Megatron-Bridge callback)
translates its framework's events into a few calls, and gives the scheduler a
:class:`Host`: where the model is, what to add to the manifest, where metrics go.  The
scheduler decides the rest:

* **dedup**: a step is exported at most once (``done_steps``, the export in flight, a held
  snapshot);
* **the export in flight**: at most one; ``on_busy`` says whether a new trigger waits for
  it or is skipped (an export that must happen, e.g. at train end, always waits);
* **the async split**: plan and host copy on the training thread (every rank agrees that
  both worked), write, commit, publish, ``latest`` and retention on one background thread
  (nice +10) per rank;
* **held snapshots**: a host copy taken now and written later (Megatron-Bridge's async
  checkpoint is finalized iterations after its weights were saved);
* **resume**: exports that were planned or in flight when the resumed checkpoint was
  written are found, redone from the restored weights, or reported lost; exports of the same
  run lineage (``run_id``) made after that checkpoint are replaced;
* **refusals** (:mod:`.store.commit`), decided by rank 0 before any collective gather starts.

Every collective goes through :class:`~.exporter.parallel.ControlPlane`; this module does
not import ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from .config import ExportConfig
from .store.commit import ExportRefusedError, check_target_dir, inside_its_checkpoint, remove_staging_of, same_lineage
from .store.manifest import ownership

__all__ = ["ExportScheduler", "Host", "Request", "ExportRun", "HeldCopy", "RunResults", "STATE_VERSION"]

log = logging.getLogger("nemo_export_hooks")

STATE_VERSION = 2  # 1: no run_id (still read)


class Host(Protocol):
    """What a framework adapter provides to the scheduler."""

    def model(self) -> Any:
        """The model to export now (a Megatron model, its chunks, or a wrapper of them)."""

    def manifest_extra(self, req: "Request") -> dict:
        """Framework facts recorded in the export's manifest (e.g. ``consumed_samples``)."""

    def log_metrics(self, metrics: dict) -> None:
        """Send ``hf_export/*`` metrics to the framework's loggers (rank 0 only calls it)."""


@dataclass
class Request:
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
class ExportRun:
    """One export from its start to its end: the request, timings, the background future
    and its outcome.  (Not ``plan.Job``, which is one tensor of an export.)"""

    req: Request
    t0: float
    blocking_s: float = 0.0
    future: Optional[Future] = None
    result: Any = None
    error: Optional[BaseException] = None
    removed: list = field(default_factory=list)
    phase: str = "still being written"  # what the background thread is doing (for messages)


@dataclass
class HeldCopy:
    """A planned export and its host copy, taken on the training thread at ``step`` and held
    until its (async) checkpoint is finalized.  (Its tensors are an
    ``exporter.snapshot.HostSnapshot``.)"""

    step: int
    prepared: Any
    tensors: Any
    blocking_s: float


# The old names, for one release.
Job = ExportRun
Snapshot = HeldCopy


class RunResults:
    """What an adapter's run produced, read from its ``scheduler``: ``exports`` (one dict per
    export: step, path, checkpoint, bytes, seconds, blocking_seconds), ``failed``, ``skipped``."""

    scheduler: "ExportScheduler"

    @property
    def exports(self) -> list[dict]:
        return self.scheduler.exports

    @property
    def failed(self) -> int:
        return self.scheduler.failed

    @property
    def skipped(self) -> int:
        return self.scheduler.skipped


class ExportScheduler:
    """Decides whether, when and how an export runs (see the module doc).

    Args:
        config: a validated :class:`ExportConfig`.
        host: the adapter's :class:`Host`.
        allow_inside: exports may live inside the checkpoint they belong to (Megatron-Bridge's
            ``iter_N/hf``); elsewhere an export inside a training checkpoint is refused.
    """

    def __init__(self, config: ExportConfig, host: Host, allow_inside: bool = False):
        self.config = config
        self.host = host
        self.allow_inside = allow_inside
        self.exports: list[dict] = []
        self.failed = 0
        self.skipped = 0
        self.run_id: Optional[str] = None
        self.done_steps: set[int] = set()
        self.owned: list[str] = []
        self.inflight: Optional[ExportRun] = None
        self.pending_save: Optional[Request] = None
        self.due: Optional[tuple[int, str]] = None
        self.resume_pending: list[dict] = []
        self.held: dict[int, HeldCopy] = {}
        self.last_trigger_step = -1
        self.active = False
        self.model_ok = False
        self.tokenizer: Any = None
        self.executor: Optional[ThreadPoolExecutor] = None
        self.control = None  # parallel.ControlPlane, made at start-up

    RUNTIME = ("executor", "control", "inflight", "pending_save", "held")

    def __getstate__(self) -> dict:
        """A copy (``copy``/``deepcopy``/pickle) has the run's state but none of its
        runtime: threads, process groups, an export in flight and held copies belong to one
        run.  (NeMo's Trainer deep-copies its callbacks.)"""
        state = dict(self.__dict__)
        for k in self.RUNTIME:
            state[k] = {} if k == "held" else None
        return state

    def adopt(self, run_id: str, step: int, path: str) -> None:
        """Continue run (lineage) ``run_id``, whose export of ``step`` at ``path`` exists:
        ``step`` counts as exported and ``path`` as this run's (replaceable, retained)."""
        self.run_id = str(run_id)
        self.done_steps.add(int(step))
        self.owned.append(str(path))

    def disown(self, path: str) -> None:
        """``path`` is no longer an export of this run (it was removed)."""
        self.owned = [p for p in self.owned if p != str(path)]

    # -- identity and state ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.control.rank if self.control is not None else 0

    @property
    def world(self) -> int:
        return self.control.world if self.control is not None else 1

    def state_dict(self) -> dict:
        pending = []
        if self.inflight is not None:
            pending.append(self.inflight.req.record("inflight"))
        if self.pending_save is not None:
            pending.append(self.pending_save.record("pending"))
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "exported_steps": sorted(self.done_steps),
            "owned": list(self.owned),
            "pending": pending,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        if not isinstance(state_dict, Mapping) or state_dict.get("version") not in (1, STATE_VERSION):
            log.warning("hf_export: ignoring callback state of unknown format in the checkpoint")
            return
        self.done_steps = {int(s) for s in state_dict.get("exported_steps", [])}
        self.owned = [str(p) for p in state_dict.get("owned", [])]
        self.resume_pending = [dict(r) for r in state_dict.get("pending", [])]
        if state_dict.get("run_id"):
            self.run_id = str(state_dict["run_id"])

    # -- start-up -------------------------------------------------------------------------
    def start_up(self) -> None:
        """Process groups, the background thread and the run identity (all ranks agree on
        rank 0's).  Idempotent."""
        from .exporter import parallel

        if self.control is None:
            self.control = parallel.ControlPlane()
        if self.executor is None and self.config.async_write:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-export", initializer=_lower_thread_priority)
        self.run_id = self.control.broadcast(self.run_id or uuid.uuid4().hex[:16])
        self.active = True

    def validate_model(self, model: Any) -> None:
        """Plan once with the full Hugging Face key check, and check ``expect_quant``: a
        model that cannot be exported fails before step 0, not at the first checkpoint."""
        from .exporter.api import prepare_export

        cfg = self.config
        prepared = prepare_export(model, cfg.arch, cfg.dtype, dict(cfg.hf_config_overrides), check_hf_keys=True)
        if cfg.expect_quant:
            got = (prepared.quant_algo or "none").upper()
            if got != str(cfg.expect_quant).upper():
                raise ValueError(
                    f"hf_export.expect_quant={cfg.expect_quant!r} but the model's quantizers give {got!r} "
                    "(quantize the model with ModelOpt before training, or change expect_quant)"
                )
        if cfg.async_write:
            # the host pool (page-locked on a GPU: seconds for tens of GB) is paid here, at
            # setup, not inside the first export's training-thread wait
            t = time.perf_counter()
            prepared.reserve_host()
            log.info("hf_export: reserved the host snapshot pool in %.2f s", time.perf_counter() - t)
        self.model_ok = True

    def train_starts_at(self, step: int, resolve_target: Callable[[dict], Path]) -> None:
        """Training (re)starts at ``step``: steps beyond it belong to a discarded future (a
        fresh run with a reused callback, or a resume from an older checkpoint) and are
        exported anew; exports pending when the resumed checkpoint was written are settled."""
        self.last_trigger_step = step
        self.done_steps = {s for s in self.done_steps if s <= step}
        if self.resume_pending:
            self._resolve_resumed(step, resolve_target)

    # -- triggers -------------------------------------------------------------------------
    def is_claimed(self, step: int) -> bool:
        job = self.inflight
        return step in self.done_steps or step in self.held or (job is not None and job.req.step == step)

    def checkpoint_starting(self, step: int, epoch: int, target: Callable[[], Path], checkpoint: Optional[str], must: bool = False) -> Optional[Request]:
        """A checkpoint of ``step`` is about to be saved: the export request for it (recorded
        by :meth:`state_dict` while the save runs), or ``None`` (claimed, refused, busy).
        ``must``: wait for an export in flight whatever ``on_busy`` says (a held copy is
        already paid for)."""
        self.pending_save = None
        if not self.active or not self.config.on_checkpoint_save:
            return None
        if self.is_claimed(step):
            log.debug("hf_export: step %d is already exported; checkpoint %s adds no export", step, checkpoint)
            return None
        try:
            req = Request(step, epoch, target(), "checkpoint", None if checkpoint is None else str(checkpoint))
        except Exception as e:
            self.handle_error(step, None, e)
            return None
        if not self.make_room(step, must=must):
            return None
        self.pending_save = req
        return req

    def checkpoint_saved(self, req: Optional[Request], snapshot: Optional[HeldCopy] = None) -> None:
        self.pending_save = None
        if req is not None:
            self.start(req, snapshot)

    def checkpoint_failed(self) -> None:
        self.pending_save = None

    def step_ended(self, step: int) -> None:
        """After optimizer step ``step``: collect a finished export; note an
        ``every_n_train_steps`` export as due (taken at the next :meth:`take_due`, so a
        checkpoint saved at the same step takes it over and names it)."""
        if not self.active:
            return
        self.poll()
        n = self.config.every_n_train_steps
        if n and step > 0 and step % n == 0 and step != self.last_trigger_step:
            self.last_trigger_step = step  # once per step (several batches per step with accumulation)
            if not self.is_claimed(step):
                self.due = (step, "every_n_train_steps")

    def take_due(self, step: int, epoch: int, target: Callable[[], Path]) -> None:
        """Run a due ``every_n_train_steps`` export if the weights are still those of its step."""
        if not self.active or self.due is None:
            return
        due_step, trigger = self.due
        self.due = None
        if due_step != step or self.is_claimed(step):
            return
        self.export_now(step, epoch, target, trigger)

    def train_ended(self, step: int, epoch: int, target: Callable[[], Path]) -> None:
        if not self.active:
            return
        if self.due is not None:
            self.take_due(step, epoch, target)
        if self.config.at_train_end and not self.is_claimed(step):
            self.export_now(step, epoch, target, "train_end", must=True)
        self.poll(wait=True)

    def export_now(self, step: int, epoch: int, target: Callable[[], Path], trigger: str, must: bool = False, checkpoint: Optional[str] = None) -> None:
        try:
            path = target()
        except Exception as e:
            self.handle_error(step, None, e)
            return
        if not self.make_room(step, must=must):
            return
        self.start(Request(step, epoch, path, trigger, checkpoint))

    # -- held snapshots (write later) -----------------------------------------------------
    def hold_snapshot(self, step: int) -> bool:
        """Plan and copy the weights of ``step`` to host memory now, to be written when its
        checkpoint is confirmed (:meth:`take_held`).  Collective; ``False`` if it failed
        (reported) or the step is claimed."""
        if not self.active or self.is_claimed(step):
            return False
        t0 = time.perf_counter()
        err, snap = self._prepare(host_copy=True)
        if err is not None:
            self.handle_error(step, None, err)
            return False
        prepared, tensors = snap
        self.held[step] = HeldCopy(step, prepared, tensors, time.perf_counter() - t0)
        return True

    def take_held(self, step: int) -> Optional[HeldCopy]:
        """The held snapshot of ``step`` (removed from the hold), dropping older ones whose
        checkpoints never came."""
        snap = self.held.pop(step, None)
        for s in [s for s in self.held if s < step]:
            log.warning("hf_export: dropped the held copy of step %d: no checkpoint of it was confirmed", s)
            del self.held[s]
        return snap

    # -- the export machinery -------------------------------------------------------------
    def make_room(self, step: int, must: bool) -> bool:
        """Collect a finished export; if one is still in flight, wait or skip."""
        self.poll()
        if self.inflight is None:
            return True
        if must or self.config.on_busy == "wait":
            busy = self.inflight.req.step
            t = time.perf_counter()
            self.poll(wait=True)
            log.info("hf_export: waited %.2f s for the export of step %d before exporting step %d", time.perf_counter() - t, busy, step)
            return True
        self.skipped += 1
        log.warning(
            "hf_export: skipped the export of step %d: the export of step %d is %s "
            "(on_busy=skip; set on_busy=wait to wait for it instead)",
            step,
            self.inflight.req.step,
            self.inflight.phase,
        )
        self._metrics({"hf_export/skipped": float(self.skipped)})
        return False

    def _prepare(self, host_copy: bool):
        """Plan and (``host_copy``) copy on the training thread; every rank agrees."""
        from .exporter.api import prepare_export

        cfg = self.config
        err: Optional[BaseException] = None
        prepared = tensors = None
        try:
            prepared = prepare_export(self.host.model(), cfg.arch, cfg.dtype, dict(cfg.hf_config_overrides), check_hf_keys=False)
            tensors = prepared.host_snapshot() if host_copy else prepared.tensors()
        except Exception as e:
            err = e
        err = self.control.agree(err)
        return err, (None if err is not None else (prepared, tensors))

    def start(self, req: Request, snapshot: Optional[HeldCopy] = None) -> None:
        """Refusals, then plan + host copy on the training thread (or a held ``snapshot``);
        write in the background (``async_write``) or here."""
        cfg = self.config
        t0 = time.perf_counter()
        err: Optional[BaseException] = None
        owned = list(self.owned)  # every earlier export was collected (make_room) before this
        replace = False  # rank 0: the target exists and is ours to replace
        # Refusals are decided by rank 0, which publishes, before the plan and the host copy:
        # nothing is gathered, copied or written for an export that cannot be published.
        if self.rank == 0:
            try:
                check_target_dir(req.path, req.checkpoint, owned, run_id=self.run_id, allow_inside=self.allow_inside)
                replace = str(req.path) in owned or same_lineage(req.path, self.run_id or "")
            except Exception as e:
                err = e
        err = self.control.agree(err)
        prepared = tensors = None
        if err is None and snapshot is not None:
            prepared, tensors = snapshot.prepared, snapshot.tensors
        elif err is None:
            err, snap = self._prepare(host_copy=cfg.async_write)
            if err is None:
                prepared, tensors = snap
        job = ExportRun(req, t0)
        if err is not None:
            job.error = err
            job.blocking_s = time.perf_counter() - t0
            self.finish(job)
            return
        manifest = self._manifest(req)
        if snapshot is not None:
            job.blocking_s = snapshot.blocking_s  # the training thread waited then, not now
        if cfg.async_write:
            if snapshot is None:
                job.blocking_s = time.perf_counter() - t0
            self.inflight = job
            job.future = self.executor.submit(self._write, job, prepared, tensors, manifest, owned, replace)  # type: ignore[union-attr]
        else:
            self._write(job, prepared, tensors, manifest, owned, replace)
            job.blocking_s += time.perf_counter() - t0
            self.finish(job)

    def _manifest(self, req: Request) -> dict:
        m = {
            "step": req.step,
            "epoch": req.epoch,
            "trigger": req.trigger,
            "checkpoint": req.checkpoint,
            "run_id": self.run_id,
            "hf_export_config": self.config.to_manifest(),
        }
        try:
            m.update(self.host.manifest_extra(req) or {})
        except Exception as e:  # facts for the manifest must never fail an export
            log.debug("hf_export: no framework facts for the manifest: %s", e)
        return m

    def _write(self, job: ExportRun, prepared, tensors, manifest: dict, owned: list, replace: bool) -> ExportRun:
        """Write, commit, publish, then (rank 0) ``latest`` and retention.  Never raises."""
        from .exporter.api import write_prepared

        cfg = self.config
        req = job.req
        try:
            job.result = write_prepared(
                prepared,
                tensors,
                req.path,
                tokenizer=self.tokenizer,
                max_shard_size=_size(cfg.max_shard_size),
                # Replace only an export this run (lineage) made: check_target_dir refused the
                # rest, and this closes the race with another run creating the directory
                # meanwhile.  Publish also checks the manifest: never a non-export.
                overwrite=replace,
                manifest_extra=manifest,
                t0=job.t0,
                group=self.control.write,
                log_level=logging.DEBUG,  # the scheduler logs its own line, with the step
                create_parent=not inside_its_checkpoint(req.path, req.checkpoint, self.allow_inside),
            )
        except BaseException as e:  # noqa: BLE001 - reported on the training thread
            job.error = e
            if self.rank == 0:
                remove_staging_of(req.path)
            return job
        finally:
            tensors = None  # drop the host copy as soon as it is written
        if self.rank == 0:
            from .store.commit import apply_retention, update_latest

            job.phase = f"published at {req.path} and is updating the latest pointer"
            if cfg.update_latest and not self.allow_inside:

                def waiting() -> None:
                    job.phase = (f"published at {req.path} and is waiting for the lock another process holds on "
                                 f"{req.path.parent} to update the latest pointer there")

                try:
                    update_latest(req.path.parent, req.path, on_wait=waiting)
                except Exception as e:  # the export itself is good
                    log.warning("hf_export: could not update the latest pointer in %s: %s", req.path.parent, e)
            job.phase = f"published at {req.path} and is applying keep_last_k"
            if cfg.keep_last_k:
                owned = [p for p in owned if p != str(req.path)] + [str(req.path)]
                try:
                    # only this lineage's exports, each holding the step it was made for
                    expect = {e["path"]: {"step": e["step"]} for e in self.exports}
                    expect[str(req.path)] = {"step": req.step}
                    job.removed = [str(p) for p in apply_retention(owned, cfg.keep_last_k, run_id=self.run_id, expect=expect)]
                except Exception as e:
                    log.warning("hf_export: retention (keep_last_k=%s) failed: %s", cfg.keep_last_k, e)
        return job

    def poll(self, wait: bool = False, raise_errors: bool = True) -> None:
        """Collect the export in flight if it finished on every rank (or wait for it)."""
        job = self.inflight
        if job is None or job.future is None:
            return
        if wait:
            try:
                job.future.result()
            except BaseException as e:  # _write never raises; this is an executor failure
                job.error = job.error or e
        done = self.control.all_true(job.future.done())
        if not done:
            return
        self.inflight = None
        self.finish(job, raise_errors=raise_errors)

    def finish(self, job: ExportRun, raise_errors: bool = True) -> None:
        """On the training thread: record, log, metrics, fail_on_error."""
        req = job.req
        if job.error is not None:
            self.handle_error(req.step, req.path, job.error, raise_errors=raise_errors)
            return
        res = job.result
        self.done_steps.add(req.step)
        removed = set(job.removed)
        self.owned = [p for p in self.owned if p not in removed and p != str(req.path)] + [str(req.path)]
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
        if self.rank == 0:
            log.info(
                "hf_export: step %d -> %s: %.3f GB in %.2f s (%.2f GB/s); training waited %.2f s",
                req.step,
                req.path,
                res.total_bytes / 1e9,
                res.seconds,
                res.gb_per_s,
                job.blocking_s,
            )
            for p in sorted(removed):
                log.info("hf_export: keep_last_k=%s removed %s", self.config.keep_last_k, p)
        self._metrics(
            {
                "hf_export/step": float(req.step),
                "hf_export/gb": res.total_bytes / 1e9,
                "hf_export/seconds": float(res.seconds),
                "hf_export/gb_per_s": float(res.gb_per_s),
                "hf_export/blocking_seconds": float(job.blocking_s),
                "hf_export/count": float(len(self.exports)),
            }
        )

    def handle_error(self, step: int, path: Optional[Path], error: BaseException, raise_errors: bool = True) -> None:
        self.failed += 1
        where = f" to {path}" if path is not None else ""
        msg = f"HF export of step {step}{where} failed: {type(error).__name__}: {error}"
        if path is not None and self.rank == 0 and not isinstance(error, ExportRefusedError):
            # A refused export wrote nothing; the staging directories of that name may belong
            # to another run's export in flight (a second run sharing dirpath): leave them.
            remove_staging_of(path)
        self._metrics({"hf_export/failed": float(self.failed)})
        if self.config.fail_on_error and raise_errors:
            raise RuntimeError(msg + " (hf_export.fail_on_error=true)") from error
        log.error("hf_export: %s; training continues (hf_export.fail_on_error=false)", msg, exc_info=error)

    def _metrics(self, metrics: dict) -> None:
        if not self.config.log_metrics or self.rank != 0:
            return
        try:
            self.host.log_metrics(metrics)
        except Exception as e:  # metrics must never break training
            log.debug("hf_export: metrics refused: %s", e)

    def _resolve_resumed(self, step: int, resolve_target: Callable[[dict], Path]) -> None:
        """Exports that were planned or in flight when the resumed checkpoint was written:
        ``found`` (completed before the restart), ``redo`` (its step is the one training
        resumes from: exported again from the restored weights) or ``lost``."""
        pending, self.resume_pending = self.resume_pending, []
        decisions = []
        if self.rank == 0:
            for rec in pending:
                s, path = int(rec["step"]), Path(rec["path"])
                own = ownership(path)
                if s in self.done_steps:
                    decisions.append("done")
                elif own.ours and own.step == s:
                    decisions.append("found")
                elif s == step:
                    decisions.append("redo")
                else:
                    decisions.append("lost")
        decisions = self.control.broadcast(decisions)
        for rec, what in zip(pending, decisions):
            s, path = int(rec["step"]), str(rec["path"])
            if what == "found":
                self.done_steps.add(s)
                self.owned = [p for p in self.owned if p != path] + [path]
                if self.rank == 0:
                    log.info("hf_export: resume: the export of step %d (%s) completed before the restart", s, path)
            elif what == "redo":
                if self.rank == 0:
                    log.info("hf_export: resume: the export of step %d was not completed before the restart; exporting it again from the restored weights", s)
                self.export_now(s, int(rec.get("epoch", 0)), lambda rec=rec: resolve_target(rec), "resume", must=True, checkpoint=rec.get("checkpoint"))
            elif what == "lost" and self.rank == 0:
                log.warning("hf_export: resume: the export of step %d (%s) was not completed before the restart and its weights are gone", s, path)

    # -- shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.active = False
        self.due = None
        self.held.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


def _size(v):
    s = str(v).strip()
    return int(s) if s.isdigit() else s


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
