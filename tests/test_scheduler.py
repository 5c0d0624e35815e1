"""The framework-free scheduler without any trainer: a real tiny Megatron-Core model, a
minimal host, real exports on disk.  Dedup, the busy policy, held snapshots, resume
decisions and run lineage are decided here for every framework's adapter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from nemo_export_hooks.config import ExportConfig
from nemo_export_hooks.exporter import api as api_mod
from nemo_export_hooks.publish import read_manifest, verify_export
from nemo_export_hooks.scheduler import ExportScheduler
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt


class Host:
    def __init__(self, model):
        self.m = model
        self.metrics: list[dict] = []

    def model(self):
        return self.m

    def manifest_extra(self, req):
        return {"framework": "none"}

    def log_metrics(self, metrics):
        self.metrics.append(metrics)


def scheduler(tmp_path, model=None, **kw):
    kw.setdefault("arch", "qwen3_moe")
    kw.setdefault("dtype", "float32")
    host = Host(model if model is not None else build_gpt(TinySpec(), seed=3))
    s = ExportScheduler(ExportConfig.from_any(None, **kw).validate(), host)
    s.start_up()
    return s, host


def target(tmp_path, step):
    return lambda: tmp_path / f"step={step}"


def test_dedup_and_manifest(mcore, tmp_path):
    s, host = scheduler(tmp_path, async_write=False)
    req = s.checkpoint_starting(2, 0, target(tmp_path, 2), "ck2")
    assert s.pending_save is req and s.state_dict()["pending"][0]["status"] == "pending"
    s.checkpoint_saved(req)
    assert s.checkpoint_starting(2, 0, target(tmp_path, 2), "ck2-again") is None  # never twice
    m = read_manifest(tmp_path / "step=2")
    assert m["step"] == 2 and m["checkpoint"] == "ck2" and m["framework"] == "none" and m["run_id"] == s.run_id
    assert verify_export(tmp_path / "step=2") == []
    assert host.metrics[-1]["hf_export/count"] == 1.0
    s.shutdown()


def test_busy_policy_skip_and_wait(mcore, tmp_path, monkeypatch):
    gate = threading.Event()
    real = api_mod.write_prepared

    def gated(*a, **k):
        gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(api_mod, "write_prepared", gated)
    s, _ = scheduler(tmp_path, async_write=True, on_busy="skip")
    s.export_now(1, 0, target(tmp_path, 1), "every_n_train_steps")
    assert s.inflight is not None and s.is_claimed(1)
    s.export_now(2, 0, target(tmp_path, 2), "every_n_train_steps")  # step 1 still writing
    assert s.skipped == 1 and not (tmp_path / "step=2").exists()
    gate.set()
    s.export_now(3, 0, target(tmp_path, 3), "train_end", must=True)  # must: waits instead
    s.poll(wait=True)
    assert [e["step"] for e in s.exports] == [1, 3] and s.skipped == 1
    s.shutdown()


def test_held_snapshot_is_written_later_with_the_weights_of_its_step(mcore, tmp_path):
    from safetensors.torch import load_file

    model = build_gpt(TinySpec(), seed=3)
    s, _ = scheduler(tmp_path, model=model, async_write=True)
    assert s.hold_snapshot(4) and s.is_claimed(4) and not s.hold_snapshot(4)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moves on
    snap = s.take_held(4)
    req = s.checkpoint_starting(4, 0, target(tmp_path, 4), "ck4", must=True)
    s.checkpoint_saved(req, snap)
    s.poll(wait=True)
    assert s.exports[0]["blocking_seconds"] == snap.blocking_s  # the wait was at hold time
    then = build_gpt(TinySpec(), seed=11)
    then.load_state_dict(before, strict=False)
    api_mod.export_to_hf(then, tmp_path / "ref", arch="qwen3_moe", dtype=torch.float32)
    api_mod.export_to_hf(model, tmp_path / "live", arch="qwen3_moe", dtype=torch.float32)
    got, ref, live = (load_file(str(next((tmp_path / d).glob("*.safetensors")))) for d in ("step=4", "ref", "live"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert any(not torch.equal(got[k], live[k]) for k in ref)
    assert s.hold_snapshot(5) and s.hold_snapshot(7)
    assert s.take_held(7).step == 7 and s.held == {}  # an older held copy whose checkpoint never came is dropped
    s.shutdown()


def test_resume_decisions_and_lineage(mcore, tmp_path):
    s, _ = scheduler(tmp_path, async_write=False)
    s.export_now(5, 0, target(tmp_path, 5), "every_n_train_steps")
    state = s.state_dict()
    state["pending"] = [
        {"step": 5, "epoch": 0, "path": str(tmp_path / "step=5"), "trigger": "checkpoint", "checkpoint": None},  # found
        {"step": 7, "epoch": 0, "path": str(tmp_path / "step=7"), "trigger": "checkpoint", "checkpoint": None},  # redo
        {"step": 6, "epoch": 0, "path": str(tmp_path / "step=6"), "trigger": "checkpoint", "checkpoint": None},  # lost
    ]
    state["exported_steps"] = []
    s.shutdown()
    r, _ = scheduler(tmp_path, async_write=False)
    r.load_state_dict(state)
    r.start_up()
    assert r.run_id == s.run_id  # the lineage comes with the checkpoint's state
    r.train_starts_at(7, lambda rec: Path(rec["path"]))
    assert [e["step"] for e in r.exports] == [7] and r.done_steps == {5, 7}
    assert not (tmp_path / "step=6").exists()
    # the same lineage may replace its own export of a discarded future; another run may not
    r.done_steps.discard(5)
    r.owned = []
    r.export_now(5, 0, target(tmp_path, 5), "resume")
    assert r.failed == 0 and [e["step"] for e in r.exports] == [7, 5]
    other, _ = scheduler(tmp_path, async_write=False, fail_on_error=True)
    with pytest.raises(RuntimeError, match="was not created by this run"):
        other.export_now(5, 0, target(tmp_path, 5), "every_n_train_steps")


def test_scheduler_owns_its_state_copy_and_adopt(mcore, tmp_path):
    """A copy (NeMo deep-copies its callbacks) keeps the run's state and none of its runtime,
    without the adapters reaching into the scheduler; ``adopt``/``disown`` are the only way
    an adapter changes its lineage."""
    import copy

    from nemo_export_hooks.scheduler import ExportRun, HeldCopy, Job, Snapshot

    assert (Job, Snapshot) == (ExportRun, HeldCopy)  # the old names, for one release
    s, _ = scheduler(tmp_path, async_write=True)
    s.adopt("abc", 4, str(tmp_path / "iter4"))
    s.hold_snapshot(6)
    assert s.executor is not None and s.control is not None and 6 in s.held
    s.host = Host(None)  # as in NeMo's copy, made before setup: no model (Megatron modules hold process groups)
    for c in (copy.deepcopy(s), copy.copy(s)):
        assert (c.run_id, c.done_steps, c.owned) == ("abc", {4}, [str(tmp_path / "iter4")])
        assert c.executor is None and c.control is None and c.inflight is None and c.held == {}
    assert s.executor is not None and 6 in s.held  # the original keeps its runtime
    s.disown(str(tmp_path / "iter4"))
    assert s.owned == [] and s.state_dict()["exported_steps"] == [4]
    s.take_held(6)
    s.shutdown()
