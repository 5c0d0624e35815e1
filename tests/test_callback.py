"""HFExportCallback driven by real Lightning trainers on CPU (tiny Megatron-Core Qwen3-MoE).

Covers: names beside Lightning checkpoints, loading in transformers with matching logits,
no staging left, `latest` and retention, templates, resume (done steps skipped, an
unfinished export redone), exceptions mid-training, fail_on_error both ways, on_busy,
async == sync byte for byte, validation at setup, stale staging cleanup.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from conftest import hf_logits, load_hf, tokens_for  # noqa: E402
from nemo_export_hooks import publish as P  # noqa: E402
from nemo_export_hooks.callback import HFExportCallback, _SaveHook, callbacks_from_cfg  # noqa: E402
from nemo_export_hooks.config import ExportConfig  # noqa: E402
from nemo_export_hooks.exporter import api as api_mod  # noqa: E402
from nemo_export_hooks.exporter import writer as writer_mod  # noqa: E402
from nemo_export_hooks.testing.cpu import TinySpec, megatron_logits  # noqa: E402
from nemo_export_hooks.testing.lightning import InjectedFailure, TinyMegatronLM  # noqa: E402

ARCH = "qwen3_moe"


def module(**kw):
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 2)
    return TinyMegatronLM(**kw)


def trainer(tmp_path, callbacks, max_steps=4, logger=False, **kw):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kw,
    )


def ckpt_cb(d, every=2, **kw):
    kw.setdefault("save_top_k", -1)
    return ModelCheckpoint(dirpath=str(d), every_n_train_steps=every, **kw)


def hidden(d: Path) -> list[str]:
    """Staging/trash leftovers (hidden directories) anywhere under d."""
    return [str(p) for p in Path(d).rglob(".*") if p.is_dir()]


def manifest(p) -> dict:
    return json.loads((Path(p) / P.MANIFEST_NAME).read_text())


class Release(pl.Callback):
    """Opens the write gate when training ends or fails (list it before the export callback)."""

    def __init__(self, gate):
        self.gate = gate

    def on_train_end(self, trainer, pl_module):
        self.gate.set()

    def on_exception(self, trainer, pl_module, exception):
        self.gate.set()


@pytest.fixture
def gated_writes(monkeypatch):
    """Background writes block until the gate opens: an export is deterministically still in
    flight for as long as the test wants (``Release(gate)`` opens it at train end/exception)."""
    import threading

    gate = threading.Event()
    orig = api_mod.write_prepared

    def gated(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(60), "test gate never opened"
        return orig(*a, **k)

    monkeypatch.setattr(api_mod, "write_prepared", gated)
    return gate


@pytest.fixture
def disk_full(monkeypatch):
    """Fail ShardWriter.add with ENOSPC for the next `n` exports (set state['n'])."""
    state = {"n": 0, "hits": 0}
    orig = writer_mod.ShardWriter.add

    def add(self, name, t):
        if state["n"] > 0 and self.total_bytes > 0:  # after a first tensor: a partial shard exists
            state["n"] -= 1
            state["hits"] += 1
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return orig(self, name, t)

    monkeypatch.setattr(writer_mod.ShardWriter, "add", add)
    return state


# -- the main path ------------------------------------------------------------------------
def test_exports_beside_lightning_checkpoints_load_in_transformers(mcore, tmp_path):
    ck_dir = tmp_path / "checkpoints"
    cb = HFExportCallback(arch=ARCH, dtype="float32", on_busy="wait")  # wait: a loaded CI machine must not skip
    m = module()
    t = trainer(tmp_path, [cb, ckpt_cb(ck_dir, every=2)], max_steps=4, logger=CSVLogger(str(tmp_path), name="logs"))
    original_save = t.save_checkpoint
    t.fit(m)

    names = sorted(p.name for p in ck_dir.iterdir())
    assert names == ["epoch=0-step=2-hf", "epoch=0-step=2.ckpt", "epoch=0-step=4-hf", "epoch=0-step=4.ckpt", "latest", "latest.txt"]
    assert hidden(tmp_path) == []
    assert os.readlink(ck_dir / "latest") == "epoch=0-step=4-hf"
    for step in (2, 4):
        d = ck_dir / f"epoch=0-step={step}-hf"
        assert P.verify_export(d) == []
        mf = manifest(d)
        assert mf["step"] == step and mf["epoch"] == 0 and mf["trigger"] == "checkpoint"
        assert mf["checkpoint"] == str(ck_dir / f"epoch=0-step={step}.ckpt")
        assert mf["consumed_samples"] == step * 2
        assert mf["hf_export_config"]["arch"] == ARCH and mf["producer"]["name"] == "nemo-export-hooks"
    assert [e["step"] for e in cb.exports] == [2, 4]
    assert all(e["blocking_seconds"] <= e["seconds"] for e in cb.exports)

    # the newest export is the trained model: transformers computes the same logits
    hf, info = load_hf(ck_dir / "latest")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    tokens = tokens_for(m.spec.vocab_size)
    diff = (hf_logits(hf, tokens) - megatron_logits(m.module, tokens)).abs().max().item()
    assert diff < 1e-4

    # metrics went to the trainer's logger
    text = (Path(t.logger.log_dir) / "metrics.csv").read_text()
    assert "hf_export/gb_per_s" in text.splitlines()[0] and "hf_export/seconds" in text
    # the save_checkpoint wrapper is gone after fit
    assert "save_checkpoint" not in vars(t) and not hasattr(t, "_nemo_export_hooks_save_hook")
    assert t.save_checkpoint == original_save


def test_every_n_steps_template_retention_and_latest(mcore, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "hf-0000").mkdir()  # a directory that is not ours: retention must not touch it
    cb = HFExportCallback(arch=ARCH, dtype="bfloat16", on_checkpoint_save=False, every_n_train_steps=1,
                          dirpath=str(out), filename="hf-{step:04d}", keep_last_k=2, on_busy="wait")
    trainer(tmp_path, [cb], max_steps=4).fit(module())
    assert [e["step"] for e in cb.exports] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir()) == ["hf-0000", "hf-0003", "hf-0004", "latest", "latest.txt"]
    assert (out / "latest.txt").read_text() == "hf-0004\n"
    assert manifest(out / "latest")["step"] == 4 and manifest(out / "hf-0004")["trigger"] == "every_n_train_steps"
    assert cb.state_dict()["owned"] == [str(out / "hf-0003"), str(out / "hf-0004")]
    assert hidden(tmp_path) == []


def test_step_trigger_coinciding_with_a_checkpoint_is_named_after_it(mcore, tmp_path):
    ck = tmp_path / "ck"
    cb = HFExportCallback(arch=ARCH, every_n_train_steps=2, on_checkpoint_save=True, on_busy="wait")
    trainer(tmp_path, [cb, ckpt_cb(ck, every=3)], max_steps=6).fit(module())
    names = sorted(p.name for p in ck.iterdir() if p.name.endswith("-hf"))
    assert names == ["epoch=0-step=3-hf", "epoch=0-step=6-hf", "step=2-hf", "step=4-hf"]
    assert [e["step"] for e in cb.exports] == [2, 3, 4, 6]
    assert manifest(ck / "epoch=0-step=6-hf")["trigger"] == "checkpoint"


def test_async_and_sync_write_identical_files(mcore, tmp_path):
    a, s = tmp_path / "async", tmp_path / "sync"
    cbs = [
        HFExportCallback(arch=ARCH, dtype="bfloat16", async_write=True, dirpath=str(a), on_busy="wait",
                         on_checkpoint_save=False, every_n_train_steps=2, max_shard_size="100KB"),
        HFExportCallback(arch=ARCH, dtype="bfloat16", async_write=False, dirpath=str(s),
                         on_checkpoint_save=False, every_n_train_steps=2, max_shard_size="100KB"),
    ]
    trainer(tmp_path, cbs, max_steps=4).fit(module())
    for step in (2, 4):
        da, ds = a / f"step={step}", s / f"step={step}"
        files = sorted(p.name for p in da.iterdir())
        assert files == sorted(p.name for p in ds.iterdir())
        assert sum(f.endswith(".safetensors") for f in files) > 1
        for f in files:
            if f != P.MANIFEST_NAME:
                assert (da / f).read_bytes() == (ds / f).read_bytes(), f
        assert manifest(da)["files"] == manifest(ds)["files"]
    # and the two steps really differ (training moved the weights)
    assert manifest(a / "step=2")["files"] != manifest(a / "step=4")["files"]


# -- resume -------------------------------------------------------------------------------
def test_resume_skips_steps_already_exported(mcore, tmp_path):
    ck = tmp_path / "ck"
    cb1 = HFExportCallback(arch=ARCH, keep_last_k=5, on_busy="wait")
    trainer(tmp_path, [cb1, ckpt_cb(ck, every=2)], max_steps=4).fit(module())
    assert [e["step"] for e in cb1.exports] == [2, 4]
    mtime = (ck / "epoch=0-step=4-hf" / P.MANIFEST_NAME).stat().st_mtime_ns

    saved = torch.load(ck / "epoch=0-step=4.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("HFExportCallback"))
    assert state["exported_steps"] == [2] and [r["step"] for r in state["pending"]] == [4]

    cb2 = HFExportCallback(arch=ARCH, keep_last_k=5, at_train_end=True, on_busy="wait")
    t2 = trainer(tmp_path, [cb2, ckpt_cb(ck, every=2)], max_steps=6)
    t2.fit(module(), ckpt_path=str(ck / "epoch=0-step=4.ckpt"))
    assert [e["step"] for e in cb2.exports] == [6]
    assert (ck / "epoch=0-step=4-hf" / P.MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert cb2.state_dict()["exported_steps"] == [2, 4, 6]
    assert cb2.state_dict()["owned"] == [str(ck / f"epoch=0-step={s}-hf") for s in (2, 4, 6)]


def test_resume_after_a_crash_replaces_the_runs_own_later_export(mcore, tmp_path):
    """Killed after ``step=9-hf`` was published but before the next checkpoint, resumed from
    ``epoch=0-step=8.ckpt``: the export of step 9 belongs to this run's lineage (the run id
    restored from the checkpoint's callback state) and is replaced from the resumed weights,
    not refused.  A fresh run sharing the directory is still refused (another lineage)."""
    ck = tmp_path / "ck"
    cb = HFExportCallback(arch=ARCH, every_n_train_steps=9, on_checkpoint_save=False, async_write=False)
    trainer(tmp_path, [cb, ckpt_cb(ck, every=4)], max_steps=9).fit(module())
    nine = ck / "step=9-hf"
    assert [e["step"] for e in cb.exports] == [9] and (ck / "epoch=0-step=8.ckpt").is_file()
    assert not (ck / "epoch=0-step=9.ckpt").exists()  # the crash came before a checkpoint of step 9
    before = (os.stat(nine).st_ino, P.read_manifest(nine)["run_id"])
    cb2 = HFExportCallback(arch=ARCH, every_n_train_steps=9, on_checkpoint_save=False, async_write=False, fail_on_error=True)
    trainer(tmp_path, [cb2, ckpt_cb(ck, every=4)], max_steps=10).fit(module(), ckpt_path=str(ck / "epoch=0-step=8.ckpt"))
    assert cb2.failed == 0 and [e["step"] for e in cb2.exports] == [9]
    m = P.read_manifest(nine)
    assert m["run_id"] == before[1] == cb2.scheduler.run_id and os.stat(nine).st_ino != before[0]  # replaced
    assert P.verify_export(nine) == []
    fresh = HFExportCallback(arch=ARCH, every_n_train_steps=9, on_checkpoint_save=False, async_write=False)
    trainer(tmp_path / "fresh", [fresh, ckpt_cb(ck, every=100)], max_steps=9).fit(module())
    assert fresh.failed == 1 and fresh.exports == [] and P.read_manifest(nine)["run_id"] == before[1]


def test_resume_redoes_an_export_that_never_finished(mcore, tmp_path, disk_full, caplog):
    ck = tmp_path / "ck"
    disk_full["n"] = 1
    cb1 = HFExportCallback(arch=ARCH)
    trainer(tmp_path, [cb1, ckpt_cb(ck, every=2)], max_steps=2).fit(module())
    assert cb1.failed == 1 and cb1.exports == [] and disk_full["hits"] == 1
    assert not (ck / "epoch=0-step=2-hf").exists() and hidden(tmp_path) == []

    cb2 = HFExportCallback(arch=ARCH)
    with caplog.at_level(logging.INFO, logger="nemo_export_hooks"):
        trainer(tmp_path, [cb2, ckpt_cb(ck, every=2)], max_steps=3).fit(module(), ckpt_path=str(ck / "epoch=0-step=2.ckpt"))
    assert [(e["step"], e["trigger"]) for e in cb2.exports] == [(2, "resume")]
    assert P.verify_export(ck / "epoch=0-step=2-hf") == [] and manifest(ck / "epoch=0-step=2-hf")["step"] == 2
    assert "exporting it again from the restored weights" in caplog.text


# -- failures -----------------------------------------------------------------------------
def test_exception_mid_training_waits_and_leaves_no_partial_export(mcore, tmp_path, gated_writes):
    out = tmp_path / "hf"
    cb = HFExportCallback(arch=ARCH, on_checkpoint_save=False, every_n_train_steps=2, dirpath=str(out))
    t = trainer(tmp_path, [Release(gated_writes), cb], max_steps=10)
    with pytest.raises(InjectedFailure):
        t.fit(module(fail_at_step=4))  # the step-2 export is still in flight when step 4 raises
    assert [e["step"] for e in cb.exports] == [2]  # on_exception waited for it: complete
    assert cb.skipped == 1  # step 4 came while step 2 was being written
    assert sorted(p.name for p in out.iterdir()) == ["latest", "latest.txt", "step=2"]
    assert P.verify_export(out / "step=2") == []
    assert hidden(tmp_path) == []
    assert "save_checkpoint" not in vars(t)


def test_exception_while_export_fails_publishes_nothing(mcore, tmp_path, disk_full, gated_writes):
    disk_full["n"] = 1
    out = tmp_path / "hf"
    cb = HFExportCallback(arch=ARCH, on_checkpoint_save=False, every_n_train_steps=2, dirpath=str(out), fail_on_error=True)
    with pytest.raises(InjectedFailure):  # the training error wins; the export error is logged
        trainer(tmp_path, [Release(gated_writes), cb], max_steps=10).fit(module(fail_at_step=3))
    assert cb.failed == 1 and cb.exports == []
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    assert hidden(tmp_path) == []


def test_fail_on_error_false_logs_cause_and_keeps_training(mcore, tmp_path, disk_full, caplog):
    disk_full["n"] = 1
    ck = tmp_path / "ck"
    cb = HFExportCallback(arch=ARCH, on_busy="wait")
    with caplog.at_level(logging.ERROR, logger="nemo_export_hooks"):
        t = trainer(tmp_path, [cb, ckpt_cb(ck, every=2)], max_steps=4)
        t.fit(module())
    assert t.global_step == 4
    assert cb.failed == 1 and [e["step"] for e in cb.exports] == [4]
    assert not (ck / "epoch=0-step=2-hf").exists() and P.verify_export(ck / "epoch=0-step=4-hf") == []
    assert hidden(tmp_path) == []
    assert "HF export of step 2" in caplog.text and "No space left on device" in caplog.text
    assert "training continues" in caplog.text
    assert any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_fail_on_error_true_raises_with_cause(mcore, tmp_path, disk_full, async_write):
    disk_full["n"] = 1
    ck = tmp_path / "ck"
    # on_busy=wait: the checkpoint of step 4 waits for the failed export of step 2 and raises
    # there, however slow the background writer is (with skip, a busy machine could let the
    # error surface only at train end)
    cb = HFExportCallback(arch=ARCH, fail_on_error=True, async_write=async_write, on_busy="wait")
    t = trainer(tmp_path, [cb, ckpt_cb(ck, every=2)], max_steps=6)
    with pytest.raises(RuntimeError, match="HF export of step 2") as ei:
        t.fit(module())
    assert isinstance(ei.value.__cause__, OSError)
    assert t.global_step <= 4
    assert not any(p.name.endswith("-hf") for p in ck.iterdir())
    assert hidden(tmp_path) == []


def test_on_busy_skip_warns_and_wait_waits(mcore, tmp_path, gated_writes, caplog):
    skip = HFExportCallback(arch=ARCH, on_checkpoint_save=False, every_n_train_steps=1, dirpath=str(tmp_path / "skip"))
    with caplog.at_level(logging.WARNING, logger="nemo_export_hooks"):
        trainer(tmp_path, [Release(gated_writes), skip], max_steps=4).fit(module())
    assert [e["step"] for e in skip.exports] == [1] and skip.skipped == 3
    assert "skipped the export of step 2: the export of step 1 is still being written" in caplog.text
    gated_writes.set()
    wait = HFExportCallback(arch=ARCH, on_checkpoint_save=False, every_n_train_steps=1, dirpath=str(tmp_path / "wait"), on_busy="wait")
    trainer(tmp_path, [wait], max_steps=3).fit(module())
    assert wait.skipped == 0 and [e["step"] for e in wait.exports] == [1, 2, 3]


def test_at_train_end_exports_final_weights(mcore, tmp_path):
    cb = HFExportCallback(arch=ARCH, on_checkpoint_save=False, at_train_end=True, placement="subdir")
    trainer(tmp_path, [cb], max_steps=3).fit(module())
    d = tmp_path / "checkpoints" / "hf" / "step=3"
    assert [e["path"] for e in cb.exports] == [str(d)]
    assert manifest(d)["trigger"] == "train_end" and P.verify_export(d) == []


# -- validation at setup ------------------------------------------------------------------
class _Counting(TinyMegatronLM):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def test_model_that_does_not_fit_arch_fails_before_step_one(mcore, tmp_path):
    _Counting.steps = 0
    cb = HFExportCallback(arch="llama")  # a MoE model cannot be written as llama
    with pytest.raises(ValueError):
        trainer(tmp_path, [cb], max_steps=2).fit(_Counting(seq_len=16, batch_size=2))
    assert _Counting.steps == 0


def test_expect_quant_on_unquantized_model_fails_at_setup(mcore, tmp_path):
    _Counting.steps = 0
    with pytest.raises(ValueError, match="expect_quant"):
        trainer(tmp_path, [HFExportCallback(arch=ARCH, expect_quant="FP8")], max_steps=2).fit(_Counting(seq_len=16, batch_size=2))
    assert _Counting.steps == 0


def test_unwritable_export_dir_fails_at_setup(mcore, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError):
        trainer(tmp_path, [HFExportCallback(arch=ARCH, dirpath=str(blocker / "sub"))], max_steps=1).fit(module())
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
    with pytest.raises(PermissionError, match="not writable"):
        trainer(tmp_path, [HFExportCallback(arch=ARCH, dirpath=str(ro / "hf"))], max_steps=1).fit(module())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(arch="gpt5"), "unknown arch"),
        (dict(arch=None), "arch is required"),
        (dict(dtype="int4"), "dtype"),
        (dict(filename="../{step}"), "escapes"),
        (dict(filename="/abs/{step}"), "absolute"),
        (dict(filename="a/{step}"), "separator"),
        (dict(filename="{step}-{loss}"), "allowed fields"),
        (dict(filename=".hidden-{step}"), "hidden"),
        (dict(filename="latest"), "reserved"),
        (dict(on_busy="queue"), "on_busy"),
        (dict(placement="nearby"), "placement"),
        (dict(placement="inside"), "only Megatron-Bridge"),
        (dict(keep_last_k=-1), "keep_last_k"),
        (dict(every_n_train_steps=-5), "every_n_train_steps"),
        (dict(max_shard_size="lots"), "max_shard_size"),
        (dict(tokenizer="/no/such/tokenizer"), "tokenizer"),
        (dict(expect_quant="int8"), "expect_quant"),
    ],
)
def test_bad_config_rejected_at_construction(kw, match):
    kw = {"arch": ARCH, **kw}
    with pytest.raises(ValueError, match=match):
        HFExportCallback(**kw)


def test_stale_staging_of_a_crashed_run_is_cleaned_at_setup(mcore, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    stale = ck / ".epoch=0-step=2-hf.staging-0123abcd"
    (stale / "sub").mkdir(parents=True)
    keep = ck / ".not-ours"
    keep.mkdir()
    cb = HFExportCallback(arch=ARCH)
    trainer(tmp_path, [cb, ckpt_cb(ck, every=5)], max_steps=1).fit(module())
    assert not stale.exists() and keep.exists()


# -- small units --------------------------------------------------------------------------
def test_state_dict_round_trip_and_state_key():
    cb = HFExportCallback(arch=ARCH, dirpath="/x")
    cb.scheduler.done_steps = {3, 1}
    cb.scheduler.owned = ["/x/a", "/x/b"]
    cb.scheduler.run_id = "r1"
    sd = cb.state_dict()
    assert sd == {"version": 2, "run_id": "r1", "exported_steps": [1, 3], "owned": ["/x/a", "/x/b"], "pending": []}
    other = HFExportCallback(arch=ARCH, dirpath="/x")
    other.load_state_dict(sd)
    assert other.scheduler.done_steps == {1, 3} and other.scheduler.owned == ["/x/a", "/x/b"] and other.scheduler.run_id == "r1"
    old = HFExportCallback(arch=ARCH, dirpath="/x")
    old.load_state_dict({"version": 1, "exported_steps": [2], "owned": [], "pending": []})  # before run ids
    assert old.scheduler.done_steps == {2} and old.scheduler.run_id is None
    assert cb.state_key == other.state_key != HFExportCallback(arch=ARCH, dirpath="/y").state_key
    other.load_state_dict({"version": 99})  # unknown format: ignored, not fatal
    assert other.scheduler.done_steps == {1, 3}


def test_checkpoint_detection_and_ownership_of_targets(tmp_path):
    """The refusals behind two fault tests, without a trainer: an export directory inside a
    training checkpoint (recognised by layout, or the checkpoint being saved), and an
    existing target that this callback did not create."""
    from nemo_export_hooks.targets import ExportRefusedError, check_target, training_checkpoint_containing

    layouts = {
        "nemo": {"weights/metadata.json": "{}", "context/io.json": "{}"},
        "dcp": {".metadata": ""},
        "megatron": {"metadata.json": "{}", "common.pt": ""},
        "epoch=0-step=1.ckpt": {"checkpoint/shard": ""},
    }
    for name, files in layouts.items():
        for rel, text in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
        hit = training_checkpoint_containing(tmp_path / name / "hf" / "not-yet")
        assert hit is not None and hit[0] == (tmp_path / name).resolve(), name
    (tmp_path / "link").symlink_to(tmp_path / "nemo", target_is_directory=True)
    assert training_checkpoint_containing(tmp_path / "link" / "hf")[0] == (tmp_path / "nemo").resolve()
    assert training_checkpoint_containing(tmp_path / "ck" / "hf") is None  # the checkpoints directory is fine
    assert training_checkpoint_containing(tmp_path / "ck" / "x" / "hf", checkpoint=str(tmp_path / "ck" / "x")) is not None
    with pytest.raises(ExportRefusedError, match="inside the training checkpoint"):
        check_target(tmp_path / "nemo" / "hf" / "step=1", None, [])

    d = tmp_path / "out"
    (d / "empty").mkdir(parents=True)
    (d / "theirs").mkdir()
    (d / "theirs" / "config.json").write_text("{}")
    check_target(d / "new", None, [])  # does not exist: fine
    check_target(d / "empty", None, [])  # nothing to lose
    check_target(d / "theirs", None, [str(d / "theirs")])  # ours: replaced
    with pytest.raises(ExportRefusedError, match="was not created by this run"):
        check_target(d / "theirs", None, [])


def test_placement_auto_picks_subdir_for_nemo_checkpoint_callbacks(tmp_path):
    NeMoLike = type("ModelCheckpoint", (ModelCheckpoint,), {"__module__": "nemo.lightning.pytorch.callbacks.model_checkpoint"})

    class T:
        checkpoint_callbacks = [NeMoLike(dirpath=str(tmp_path))]

    cb = HFExportCallback(arch=ARCH)
    assert cb._placement(T()) == "subdir"
    assert cb._target(T(), 10, 0, str(tmp_path / "model--step=10.ckpt")) == tmp_path / "hf" / "model--step=10"
    T.checkpoint_callbacks = [ModelCheckpoint(dirpath=str(tmp_path))]
    assert cb._placement(T()) == "sibling"
    assert cb._target(T(), 10, 0, str(tmp_path / "model--step=10")) == tmp_path / "model--step=10-hf"


def test_save_hook_is_shared_and_restored():
    class FakeTrainer:
        def save_checkpoint(self, filepath, weights_only=False, storage_options=None):
            self.saved = filepath

    t = FakeTrainer()
    a, b = HFExportCallback(arch=ARCH, dirpath="/a"), HFExportCallback(arch=ARCH, dirpath="/b")
    _SaveHook.attach(t, a)
    _SaveHook.attach(t, b)
    wrapper = t.save_checkpoint
    assert "save_checkpoint" in vars(t)
    t.save_checkpoint("/x.ckpt")  # inactive callbacks: plain pass-through
    assert t.saved == "/x.ckpt"
    _SaveHook.detach(t, a)
    assert t.save_checkpoint is wrapper
    _SaveHook.detach(t, b)
    assert "save_checkpoint" not in vars(t)


def test_callbacks_from_cfg():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {}, "hf_export": {"enabled": False, "arch": ARCH}})
    assert callbacks_from_cfg(cfg) == []
    cfg.hf_export.enabled = True
    (cb,) = callbacks_from_cfg(cfg)
    assert isinstance(cb, HFExportCallback) and cb.config.arch == ARCH
    (cb,) = callbacks_from_cfg(ExportConfig(arch=ARCH, keep_last_k=2))
    assert cb.config.keep_last_k == 2
    with pytest.raises(ValueError, match="unknown arch"):
        callbacks_from_cfg({"hf_export": {"enabled": True, "arch": "nope"}})


# -- several ranks (torchrun, gloo, CPU) --------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("extra", [["--fail-rank", "1", "--fail-exports", "1"], ["--sync"]], ids=["async-fail-on-rank1", "sync"])
def test_two_ranks_data_parallel(tmp_path, extra):
    """Lightning DDP on gloo, 2 ranks: the callback's gloo groups, agreement on finished
    exports, background collectives; a failure on rank 1 fails that export on both ranks
    (nothing published, training goes on), later exports succeed and match transformers."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "nemo_export_hooks.testing.lightning", "--out", str(tmp_path / "run"), *extra],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(lines[-1])
    assert res["ok"], res
    assert res["steps"] == ([4, 6] if "--fail-rank" in extra else [2, 4, 6])
    assert res["failed"] == (1 if "--fail-rank" in extra else 0)
    if "--fail-rank" in extra:
        # every rank raises the coordinator's refusal, which names the failed rank and its error
        assert "failed: rank 1: OSError" in r.stderr and "injected on rank 1" in r.stderr


def _free_port() -> int:
    from nemo_export_hooks.testing.cpu import free_port

    return free_port()


def test_reused_callback_in_a_fresh_run_exports_again(mcore, tmp_path):
    cb = HFExportCallback(arch=ARCH, on_checkpoint_save=False, every_n_train_steps=2, dirpath=str(tmp_path / "hf"), on_busy="wait")
    trainer(tmp_path, [cb], max_steps=2).fit(module())
    first = manifest(tmp_path / "hf" / "step=2")["files"]
    trainer(tmp_path, [cb], max_steps=2).fit(module(seed=7))  # from step 0 again, other weights
    assert [e["step"] for e in cb.exports] == [2, 2]
    assert manifest(tmp_path / "hf" / "step=2")["files"] != first  # replaced by the second run's export
    assert cb.state_dict()["owned"] == [str(tmp_path / "hf" / "step=2")]


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_from_a_directory_and_from_the_model(mcore, tmp_path):
    from transformers import AutoTokenizer

    tok = _tiny_tokenizer(TinySpec().vocab_size)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    m = module()
    m.tokenizer = tok  # what tokenizer="auto" looks for (NeMo models carry one too)
    a = HFExportCallback(arch=ARCH, on_checkpoint_save=False, at_train_end=True, dirpath=str(tmp_path / "a"), tokenizer=str(tok_dir))
    b = HFExportCallback(arch=ARCH, on_checkpoint_save=False, at_train_end=True, dirpath=str(tmp_path / "b"), tokenizer="auto")
    trainer(tmp_path, [a, b], max_steps=1).fit(m)
    for d in (tmp_path / "a" / "step=1", tmp_path / "b" / "step=1"):
        assert (d / "tokenizer.json").is_file() and P.verify_export(d) == []
        assert AutoTokenizer.from_pretrained(str(d))("t1 t2")["input_ids"] == [1, 2]


def test_deepcopy_leaves_the_run_behind(mcore):
    """NeMo's Trainer deep-copies its callbacks: the copy keeps the run's state (run id,
    steps, owned exports) and none of its runtime; the scheduler's own ``__getstate__``
    decides that (the callback no longer copies the scheduler's ``__dict__``)."""
    import copy

    cb = HFExportCallback(arch=ARCH)
    cb.scheduler.start_up()
    cb.scheduler.adopt(cb.scheduler.run_id, 2, "/x/step=2-hf")
    c = copy.deepcopy(cb)
    assert (c.scheduler.run_id, c.scheduler.done_steps, c.scheduler.owned) == (cb.scheduler.run_id, {2}, ["/x/step=2-hf"])
    assert c.scheduler.executor is None and c.scheduler.control is None and c.scheduler.held == {}
    assert c.scheduler.host.cb is c and c.placement.config is c.config  # one object graph, copied whole
    assert cb.scheduler.executor is not None and cb.scheduler.control is not None
    cb.scheduler.shutdown()
