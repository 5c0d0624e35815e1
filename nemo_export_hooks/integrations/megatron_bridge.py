"""``HFExportBridgeCallback``: the Megatron-Bridge adapter of the export scheduler.

Pass it to Megatron-Bridge's training entry points::

    from megatron.bridge.training.pretrain import pretrain
    from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback

    pretrain(cfg, forward_step, callbacks=[HFExportBridgeCallback(arch="qwen3_moe")])

Every checkpoint Megatron-Bridge saves then gets a Hugging Face export, by default inside
it at ``<checkpoint.save>/iter_NNNNNNN/hf`` (where Bridge's own ``also_save_hf_checkpoint``
writes, so Bridge's checkpoint rotation removes the export with its checkpoint).
``placement="subdir"`` puts it at ``<save>/hf/iter_NNNNNNN``, ``"sibling"`` at
``<save>/iter_NNNNNNN-hf``, ``dirpath=D`` at ``D/<filename>``.  Exports without a checkpoint
(``every_n_train_steps``, ``at_train_end``) go to ``<save>/hf/iter_NNNNNNN`` (or ``dirpath``).

Which weights an export holds (facts of Bridge's loop, ``training/train.py`` and
``training/checkpointing.py``): ``on_train_step_end`` fires *before* ``train_state.step``
is incremented; the checkpoint of iteration N is saved after the increment, with
``train_state.step == N``; ``on_checkpoint_save`` fires on every rank

* with a synchronous save, right after it is finalized: the live weights are the saved ones;
* with ``async_save``, as a finalize function of a *later* iteration (at the top of the
  training loop, or blocking at the end of training), against the live model.  Exporting
  the live weights then would publish a later step's weights under iteration N's name.  So
  at ``on_train_step_start`` of the iteration after an interval save (``save_interval``),
  before the next optimizer step, the weights of N are planned and copied to host memory
  (the training thread's only wait), held, and written when ``on_checkpoint_save`` confirms
  N.  A save that ends training (signal, duration, ``exit_interval``, the final save) is
  finalized with the live weights still those of N.  An async save that is neither (the
  batch-size ramp-up save) cannot be exported: it is reported as a failed export, naming
  the iteration.

The iteration a finalize belongs to is read (rank 0, then broadcast) from Bridge's tracker
``<save>/latest_checkpointed_iteration.txt``, which Bridge writes before firing the event.

The run's identity lives where Bridge keeps the run's state: at every ``on_checkpoint_save``
of iteration N, rank 0 writes ``iter_NNNNNNN/hf_export_state.json`` (:data:`STATE_NAME`: the
``run_id``, the iterations exported so far, the exports this run owns, the export of N if it
is still being written) into that checkpoint.  Bridge has no per-callback state in its
checkpoint (``CallbackContext.user_state`` is not saved), and the file is deleted with the
checkpoint by Bridge's rotation.  After a restart (``train_state.step == K > 0``) that file
of ``iter_K`` (under ``checkpoint.load``, else ``checkpoint.save``) gives the run back its
identity, whatever exports exist (retention may have deleted the export of K, or it was
skipped or failed: then it is redone from the restored weights); a checkpoint written before
this file existed falls back to the manifest of ``iter_K``'s export.

An export inside ``iter_N/`` never holds other weights than ``iter_N``'s checkpoint: when
iteration N is saved again (a resume from an older iteration re-saves the iterations of the
discarded future; Bridge overwrites ``iter_N``), an ``iter_N/hf`` left by the earlier save
is removed before the new one is written, whether or not the new export succeeds.  No export
ever creates ``iter_N/`` itself: one whose checkpoint directory is gone (rotated away) is
refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import json

from ..config import ExportConfig
from ..placement import BRIDGE, HF_SUBDIR, Placement
from ..scheduler import ExportScheduler, Request, RunResults
from ..store.commit import check_writable, refuse_inside_checkpoint
from ..store.manifest import ownership

try:  # the real base class where Megatron-Bridge is installed (Python 3.12, CUDA)
    from megatron.bridge.training.callbacks import Callback as _BridgeCallback
except Exception:  # pragma: no cover - exercised on CPU, where Bridge does not import

    class _BridgeCallback:  # type: ignore[no-redef]
        """Stand-in base: the events are plain methods taking a ``CallbackContext``."""


__all__ = ["HFExportBridgeCallback", "bridge_callbacks", "checkpoint_name", "read_tracker", "read_run_state", "TRACKER_NAME", "STATE_NAME"]

log = logging.getLogger("nemo_export_hooks")

TRACKER_NAME = "latest_checkpointed_iteration.txt"
STATE_NAME = "hf_export_state.json"  # the callback's state, inside each iteration's checkpoint
_STATE_MAX_BYTES = 16 << 20


def checkpoint_name(save_dir: str | Path, iteration: int) -> Path:
    """Bridge's ``get_checkpoint_name(save, iteration)`` for a non-release checkpoint."""
    return Path(save_dir) / f"iter_{int(iteration):07d}"


def read_tracker(save_dir: str | Path) -> Optional[int]:
    """The iteration in Bridge's tracker file, or ``None`` (missing, ``release``, unreadable)."""
    try:
        text = (Path(save_dir) / TRACKER_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_run_state(checkpoint_dir: str | Path) -> Optional[dict]:
    """The callback state saved in a Bridge checkpoint directory (:data:`STATE_NAME`), or
    ``None`` (absent, unreadable, not a bounded regular file, not an object)."""
    import stat

    p = Path(checkpoint_dir) / STATE_NAME
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _STATE_MAX_BYTES:
            return None
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _check_run_state(data: dict) -> None:
    """Raise ``ValueError`` unless ``data`` has the shape ``ExportScheduler.state_dict`` writes."""
    ok = (
        isinstance(data.get("run_id"), str)
        and isinstance(data.get("exported_steps", []), list)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in data.get("exported_steps", []))
        and isinstance(data.get("owned", []), list)
        and all(isinstance(p, str) for p in data.get("owned", []))
        and isinstance(data.get("pending", []), list)
        and all(isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("path"), str) for r in data.get("pending", []))
    )
    if not ok:
        raise ValueError(f"{STATE_NAME} does not have the expected fields (run_id, exported_steps, owned, pending)")


class _BridgeHost:
    """The scheduler's view of one Megatron-Bridge run (the latest ``CallbackContext``)."""

    def __init__(self):
        self.ctx: Any = None

    def model(self):
        return list(self.ctx.model)

    def manifest_extra(self, req: Request) -> dict:
        ts = self.ctx.state.train_state
        if int(ts.step) != req.step:  # a held copy: the counters have moved on since
            return {"iteration": req.step}
        return {"iteration": req.step, "consumed_samples": int(ts.consumed_train_samples)}

    def log_metrics(self, metrics: dict) -> None:
        st = self.ctx.state
        writer = getattr(st, "tensorboard_logger", None)
        if writer is None:
            return
        for k, v in metrics.items():
            writer.add_scalar(k, v, int(st.train_state.step))


class HFExportBridgeCallback(RunResults, _BridgeCallback):
    """Export a Hugging Face checkpoint for every Megatron-Bridge checkpoint (module doc).

    Args:
        config: an :class:`ExportConfig`, a mapping or an OmegaConf node (``hf_export``).
        tokenizer: a tokenizer object or directory; overrides ``config.tokenizer``
            (``"auto"``: Bridge's dataset tokenizer if it can ``save_pretrained``, or
            ``cfg.tokenizer.tokenizer_model`` when that is a directory).
        **overrides: any ``ExportConfig`` field, e.g. ``arch="qwen3_moe"``.

    After training, ``exports`` lists what was exported (``step`` is the checkpoint
    iteration), ``failed`` and ``skipped`` count the rest.
    """

    def __init__(self, config: Any = None, *, tokenizer: Any = None, **overrides):
        super().__init__()
        if tokenizer is not None:
            overrides["tokenizer"] = tokenizer
        self.config = ExportConfig.from_any(config, **overrides).validate()
        self.placement = Placement(self.config, BRIDGE)
        self._host = _BridgeHost()
        self.scheduler = ExportScheduler(self.config, self._host, allow_inside=self._inside())


    # -- events ---------------------------------------------------------------------------
    def on_train_start(self, context) -> None:
        cfg = self.config
        if not cfg.enabled:
            return
        self._host.ctx = context
        ck = context.state.cfg.checkpoint
        save = getattr(ck, "save", None)
        if cfg.on_checkpoint_save and not save and cfg.dirpath is None:
            log.warning("hf_export: checkpoint.save is not set, so no checkpoint is saved and on_checkpoint_save exports nothing")
        if save is None and cfg.dirpath is None and (cfg.every_n_train_steps or cfg.at_train_end):
            raise ValueError("hf_export: every_n_train_steps / at_train_end exports need checkpoint.save or hf_export.dirpath")
        for d in self._export_dirs(context):
            refuse_inside_checkpoint(d)
            check_writable(d)
        self._set_tokenizer(context)
        step = int(context.state.train_state.step)
        adopt = step > 0 and self.scheduler.run_id is None and bool(save)
        self.scheduler.start_up()
        if adopt:
            self._adopt_lineage(context, step)
        self.scheduler.validate_model(list(context.model))
        if self.scheduler.rank == 0:
            self._clean_stale_staging(Path(save) if save else None, Path(cfg.dirpath).expanduser() if cfg.dirpath is not None else None)
        self.scheduler.train_starts_at(step, lambda rec: Path(rec["path"]))

    def on_train_step_start(self, context) -> None:
        if not self.scheduler.active:
            return
        self._host.ctx = context
        k = int(context.state.train_state.step)
        ck = context.state.cfg.checkpoint
        if self._saved_async_at(ck, k) and self.config.on_checkpoint_save:
            self._drop_stale_inside(context, k)  # iter_k was just saved again: an older iter_k/hf is stale
            self.scheduler.hold_snapshot(k)  # weights of iteration k, before step k+1 changes them
        self.scheduler.take_due(k, 0, lambda: self._target(context, k, None))

    def on_train_step_end(self, context) -> None:
        if not self.scheduler.active:
            return
        self._host.ctx = context
        # train_state.step is incremented after this event: the iteration just done is step+1
        self.scheduler.step_ended(int(context.state.train_state.step) + 1)

    def on_checkpoint_save(self, context) -> None:
        if not self.scheduler.active:
            return
        self._host.ctx = context
        save = context.state.cfg.checkpoint.save
        live = int(context.state.train_state.step)
        n = self.scheduler.control.broadcast(read_tracker(save) if self.scheduler.rank == 0 else None)
        n = live if n is None else int(n)
        ckpt = str(checkpoint_name(save, n))
        self._drop_stale_inside(context, n)
        held = self.scheduler.take_held(n) if n != live else None
        req = self.scheduler.checkpoint_starting(n, 0, lambda: self._target(context, n, ckpt), ckpt, must=held is not None)
        self._save_run_state(Path(ckpt), n)
        if req is None:
            return
        if n != live and held is None:
            self.scheduler.checkpoint_failed()
            self.scheduler.handle_error(
                n,
                req.path,
                RuntimeError(
                    f"the async checkpoint of iteration {n} ({ckpt}) was finalized at iteration {live}, and no copy of "
                    f"iteration {n}'s weights was held (only saves at multiples of checkpoint.save_interval are "
                    "copied ahead); the live weights are not the saved ones, so nothing was exported for it"
                ),
            )
            return
        self.scheduler.checkpoint_saved(req, held)

    def on_train_end(self, context) -> None:
        if not self.scheduler.active:
            return
        self._host.ctx = context
        step = int(context.state.train_state.step)
        try:
            self.scheduler.train_ended(step, 0, lambda: self._target(context, step, None))
        finally:
            self.scheduler.shutdown()

    # -- Bridge specifics -----------------------------------------------------------------
    @staticmethod
    def _saved_async_at(ck, k: int) -> bool:
        """Did the previous loop iteration schedule an async interval save of iteration ``k``?"""
        interval = getattr(ck, "save_interval", None)
        return bool(getattr(ck, "async_save", False) and getattr(ck, "save", None) and interval and k > 0 and k % int(interval) == 0)

    def _placement(self) -> str:
        return self.placement.mode()

    def _inside(self) -> bool:
        """Checkpoint exports go inside the checkpoint (``iter_N/hf``): ``dirpath`` overrides it."""
        return self.placement.inside

    def _target(self, context, step: int, checkpoint: Optional[str]) -> Path:
        save = context.state.cfg.checkpoint.save
        ckpt_dir = Path(save) if save is not None else None
        return self.placement.target(f"iter_{int(step):07d}", step, 0, checkpoint, ckpt_dir)

    def _export_dirs(self, context) -> list[Path]:
        save = context.state.cfg.checkpoint.save
        return self.placement.export_dirs([Path(save)] if save else [], Path(save) if save else None)

    def _adopt_lineage(self, context, step: int) -> None:
        """A resumed run continues the run it resumed from: its identity, exported
        iterations and owned exports, from the state saved in the resumed checkpoint
        (module doc), else from the manifest of that checkpoint's export.  Collective."""
        state = None
        if self.scheduler.rank == 0:
            try:
                state = self._find_run_state(context, step)
            except Exception as e:  # a damaged state file must not stop training (nor hang the other ranks)
                log.warning("hf_export: ignoring the export state saved in iteration %d's checkpoint: %s", step, e)
        state = self.scheduler.control.broadcast(state)
        if state is None:
            return
        kind, data = state
        if kind == "state":
            self.scheduler.load_state_dict(data)
            log.info("hf_export: resumed at iteration %d: continuing run %s (its state in the checkpoint: exported %s)",
                     step, self.scheduler.run_id, sorted(self.scheduler.done_steps))
        else:
            self.scheduler.adopt(data["run_id"], step, data["path"])
            log.info("hf_export: resumed at iteration %d: its export %s exists; continuing run %s", step, data["path"], data["run_id"])

    def _find_run_state(self, context, step: int) -> Optional[tuple]:
        ck = context.state.cfg.checkpoint
        dirs = [d for d in (getattr(ck, "load", None), getattr(ck, "save", None)) if d]
        for d in dirs:
            data = read_run_state(checkpoint_name(d, step))
            if data is not None and data.get("run_id") and data.get("iteration", step) == step:
                try:
                    _check_run_state(data)
                except ValueError as e:
                    log.warning("hf_export: ignoring the export state saved in iteration %d's checkpoint %s: %s", step, checkpoint_name(d, step), e)
                    continue
                return ("state", data)
        path = self._target(context, step, str(checkpoint_name(ck.save, step)))
        own = ownership(path)
        if own.ours and own.step == step and own.run_id:
            return ("manifest", {"run_id": str(own.run_id), "path": str(path)})
        return None

    def _save_run_state(self, ckpt: Path, n: int) -> None:
        """Rank 0: the run's state as of iteration ``n`` into its checkpoint (module doc).
        Only what iteration ``n`` had: with async saves the live run may be further on."""
        sch = self.scheduler
        if sch.rank != 0:
            return
        st = sch.state_dict()
        step_of = {e["path"]: e["step"] for e in sch.exports}
        st["exported_steps"] = [s for s in st["exported_steps"] if s <= n]
        st["owned"] = [p for p in st["owned"] if step_of.get(p, n) <= n]
        st["pending"] = [r for r in st["pending"] if int(r["step"]) <= n]
        st["iteration"] = n
        if not ckpt.is_dir():  # rotated away already: never re-create a checkpoint directory
            log.warning("hf_export: could not save the export state of iteration %d: %s no longer exists", n, ckpt)
            return
        from ..store.fs import atomic_write_text

        try:
            atomic_write_text(ckpt / STATE_NAME, json.dumps(st, indent=1, sort_keys=True) + "\n")
        except OSError as e:
            log.warning("hf_export: could not save the export state of iteration %d in its checkpoint: %s", n, e)

    def _drop_stale_inside(self, context, n: int) -> None:
        """Rank 0: iteration ``n`` is being saved (again): an export of ours already inside
        ``iter_n/`` was made from an earlier save of ``n`` (a discarded run's weights), so it
        is removed before anything else (the new export, if it succeeds, takes its place)."""
        from ..store.fs import remove_tree
        from ..store.manifest import is_our_export

        sch = self.scheduler
        if sch.rank != 0 or not self._inside() or n in sch.done_steps:
            return
        job = sch.inflight
        if job is not None and job.req.step == n:
            return
        save = context.state.cfg.checkpoint.save
        try:
            path = self._target(context, n, str(checkpoint_name(save, n)))
        except Exception:
            return  # reported by the export itself
        if not path.is_dir() or path.is_symlink():
            return
        if not is_our_export(path):
            log.warning("hf_export: %s is not an export of ours; it was left alone, although iteration %d was saved again", path, n)
            return
        try:
            remove_tree(path)
        except OSError as e:
            log.warning("hf_export: could not remove %s, made from an earlier save of iteration %d: %s", path, n, e)
            return
        sch.disown(str(path))
        log.info("hf_export: removed %s: it held the weights of an earlier save of iteration %d (a discarded run), not of the checkpoint saved now", path, n)

    def _set_tokenizer(self, context) -> None:
        """``tokenizer="auto"``: Bridge's dataset tokenizer if it can ``save_pretrained``, else
        ``cfg.tokenizer.tokenizer_model`` when that is a directory."""
        cfg = context.state.cfg
        self.scheduler.tokenizer = self.placement.tokenizer(
            found=[getattr(getattr(cfg, "dataset", None), "tokenizer", None)],
            model_dirs=[getattr(getattr(cfg, "tokenizer", None), "tokenizer_model", None)],
        )

    @staticmethod
    def _clean_stale_staging(save: Optional[Path], dirpath: Optional[Path] = None) -> None:
        from ..store.commit import clean_stale_staging

        dirs = []
        if save is not None and save.is_dir():
            dirs += [save, save / HF_SUBDIR] + sorted(p for p in save.glob("iter_*") if p.is_dir())
        if dirpath is not None:
            dirs.append(dirpath)
        for d in dirs:
            if d.is_dir():
                for p in clean_stale_staging(d):
                    log.info("hf_export: removed a crashed run's staging directory %s", p)


def bridge_callbacks(cfg: Any, key: str = "hf_export", tokenizer: Any = None) -> list:
    """The callbacks a Megatron-Bridge recipe asks for: ``[HFExportBridgeCallback]`` when
    ``hf_export.enabled`` is true (``cfg`` is the recipe's config holding ``hf_export``, or
    that node itself), else ``[]``."""
    from . import export_node

    node = export_node(cfg, key)
    return [HFExportBridgeCallback(node, tokenizer=tokenizer)] if node is not None else []
