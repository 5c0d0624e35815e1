"""HFExportBridgeCallback on CPU, driven by a stand-in of Megatron-Bridge's training loop
(:mod:`nemo_export_hooks.testing.bridge_loop`: Bridge itself needs Python 3.12 and CUDA; the
real loop is proved on the device by ``tests/gpu/bridge_smoke.py``).

The key property: every export holds exactly the weights its checkpoint saved, checked by
loading the checkpoint's weights back into a fresh model, exporting that, and comparing the
two exports tensor by tensor, byte for byte, for synchronous and for async saves (where
``on_checkpoint_save`` fires iterations later, against a model that has trained on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import hf_logits, load_hf, tokens_for
from nemo_export_hooks import export_to_hf
from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback, bridge_callbacks, read_run_state, read_tracker
from nemo_export_hooks.publish import read_manifest, verify_export
from nemo_export_hooks.testing.bridge_loop import BridgeRun, CheckpointConfig, load_saved_weights
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt, megatron_logits

ARCH = "qwen3_moe"
SPEC = TinySpec()


def tensors_of(export: Path) -> dict:
    index = json.loads((export / "model.safetensors.index.json").read_text())
    out = {}
    for name, part in index["weight_map"].items():
        with safe_open(str(export / part), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def assert_export_holds_checkpoint(export: Path, save: Path, iteration: int, tmp_path: Path) -> None:
    """Reload iter_N's saved weights into a fresh model, export it, compare byte for byte."""
    fresh = build_gpt(SPEC, seed=99)  # other initial weights: everything must come from the checkpoint
    load_saved_weights(fresh, save, iteration)
    ref = tmp_path / f"ref-{iteration}"
    export_to_hf(fresh, ref, arch=ARCH, dtype=torch.float32)
    got, want = tensors_of(export), tensors_of(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"iteration {iteration}: {k} differs"


def run(tmp_path, async_save, train_iters=6, interval=2, start=0, model=None, unpredicted=(), seed=0, kill_at=None, before=(), **cb_kw):
    save = tmp_path / "ckpt"
    cb_kw.setdefault("on_busy", "wait")  # exports must not depend on how fast the writer is
    cb = HFExportBridgeCallback(arch=ARCH, dtype="float32", **cb_kw)
    for b in before:  # callbacks run before the export callback, and may watch it
        b.export_cb = cb
    model = model if model is not None else build_gpt(SPEC, seed=5)
    loop = BridgeRun(model, [*before, cb], CheckpointConfig(str(save), interval, async_save, load=str(save) if start else None), train_iters,
                     start_step=start, unpredicted_saves=unpredicted, seed=seed, kill_at=kill_at)
    loop.run()
    if loop.killed:
        cb.scheduler.shutdown()  # the dead process's writer thread: let it end before the next run
    return cb, loop, save, model


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_each_export_holds_its_checkpoints_weights(mcore, tmp_path, async_save):
    cb, loop, save, model = run(tmp_path, async_save)
    assert cb.failed == 0 and cb.skipped == 0
    assert [e["step"] for e in cb.exports] == [2, 4, 6]
    if async_save:
        # the stand-in finalizes two iterations late: exporting the live weights would be wrong
        assert loop.live_at_finalize == {2: 4, 4: 6, 6: 6}
    for e in cb.exports:
        n = e["step"]
        export = save / f"iter_{n:07d}" / "hf"
        assert e["path"] == str(export) and e["checkpoint"] == str(save / f"iter_{n:07d}")
        assert verify_export(export) == []
        assert_export_holds_checkpoint(export, save, n, tmp_path)
        m = read_manifest(export)
        assert m["step"] == n and m["iteration"] == n and m["run_id"] == cb.scheduler.run_id
    assert read_tracker(save) == 6
    # the last export against the final model, through transformers
    hf, info = load_hf(save / "iter_0000006" / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    tok = tokens_for(SPEC.vocab_size)
    diff = (hf_logits(hf, tok) - megatron_logits(model, tok)).abs().max().item()
    assert diff < 1e-4, diff


def test_async_weights_differ_between_save_and_finalize(mcore, tmp_path):
    """The async case above can fail: a copy taken at finalize time would hold other weights."""
    cb, loop, save, model = run(tmp_path, async_save=True, train_iters=4)
    fresh = build_gpt(SPEC, seed=99)
    load_saved_weights(fresh, save, 2)
    saved = dict(fresh.state_dict())
    live_later = {k: v for k, v in loop.model.state_dict().items() if "_extra_state" not in k}
    assert any(not torch.equal(saved[k], v) for k, v in live_later.items() if k in saved)
    assert_export_holds_checkpoint(save / "iter_0000002" / "hf", save, 2, tmp_path)


def test_async_save_at_an_unpredicted_iteration_is_reported_not_exported(mcore, tmp_path, caplog):
    """A save outside save_interval (Bridge's batch-size ramp-up save) finalized later: no copy
    was held, the live weights are not the saved ones: nothing is written for it."""
    cb, loop, save, _ = run(tmp_path, async_save=True, train_iters=6, interval=4, unpredicted=(3,))
    assert cb.failed == 1
    assert "iteration 3" in caplog.text and "no copy of iteration 3's weights was held" in caplog.text
    assert not (save / "iter_0000003" / "hf").exists()
    assert [e["step"] for e in cb.exports] == [4, 6]
    assert_export_holds_checkpoint(save / "iter_0000004" / "hf", save, 4, tmp_path)


def test_placements_and_every_n_without_checkpoint(mcore, tmp_path):
    cb, _, save, _ = run(tmp_path, async_save=False, train_iters=4, interval=4, placement="subdir", every_n_train_steps=3)
    assert [(e["step"], e["path"]) for e in cb.exports] == [(3, str(save / "hf" / "iter_0000003")), (4, str(save / "hf" / "iter_0000004"))]
    assert (save / "hf" / "latest").resolve() == (save / "hf" / "iter_0000004").resolve()
    cb2, _, save2, _ = run(tmp_path / "b", async_save=False, train_iters=2, interval=2, placement="sibling")
    assert cb2.exports[0]["path"] == str(save2 / "iter_0000002-hf")
    cb3, _, _, _ = run(tmp_path / "c", async_save=False, train_iters=2, interval=2, dirpath=str(tmp_path / "D"), filename="hf-{step:05d}")
    assert cb3.exports[0]["path"] == str(tmp_path / "D" / "hf-00002")


def test_resume_continues_the_lineage(mcore, tmp_path):
    """Restart from iteration 4 (its export exists): the run id is taken over, iteration 4 is
    not exported again, the export of iteration 6 replaces the crashed run's (same lineage)."""
    cb, _, save, _ = run(tmp_path, async_save=False, train_iters=6)
    first_id = cb.scheduler.run_id
    model = build_gpt(SPEC, seed=77)
    load_saved_weights(model, save, 4)
    cb2, _, _, _ = run(tmp_path, async_save=True, train_iters=6, start=4, model=model)
    assert cb2.scheduler.run_id == first_id and cb2.failed == 0
    assert [e["step"] for e in cb2.exports] == [6]
    assert read_manifest(save / "iter_0000006" / "hf")["run_id"] == first_id
    assert_export_holds_checkpoint(save / "iter_0000006" / "hf", save, 6, tmp_path)


def test_another_runs_export_is_not_replaced(mcore, tmp_path):
    """Outside the checkpoint (``placement="subdir"``) a fresh run sharing the save directory
    does not replace an earlier run's export."""
    cb, _, save, _ = run(tmp_path, async_save=False, train_iters=2, placement="subdir")
    cb2, _, _, _ = run(tmp_path, async_save=False, train_iters=2, placement="subdir")  # a fresh run, same save dir
    assert cb2.failed == 1 and cb2.exports == []
    assert read_manifest(save / "hf" / "iter_0000002")["run_id"] == cb.scheduler.run_id


def test_a_fresh_run_resaving_an_iteration_replaces_the_export_inside_it(mcore, tmp_path):
    """Inside ``iter_N/`` the export must hold iter_N's weights: a fresh run that saves
    iteration N again over an earlier run's checkpoint also replaces the export inside it."""
    run(tmp_path, async_save=False, train_iters=2)
    cb2, _, save, _ = run(tmp_path, async_save=False, train_iters=2, seed=3)
    assert cb2.failed == 0 and [e["step"] for e in cb2.exports] == [2]
    assert read_manifest(save / "iter_0000002" / "hf")["run_id"] == cb2.scheduler.run_id
    assert_export_holds_checkpoint(save / "iter_0000002" / "hf", save, 2, tmp_path)


RESUME_CASES = {
    # hf_export's retention deleted the export of the resume iteration (issue 24, item 1)
    "keep_last_2": dict(keep_last_k=2),
    "keep_all": dict(),
    # the export of the resume iteration failed (its target was in the way, since removed)
    "resume_export_failed": dict(),
}
# (a checkpoint without the saved state and no export to take the identity from: the run gets
# a new id, and the export inside each re-saved iteration is still replaced, see
# test_a_fresh_run_resaving_an_iteration_replaces_the_export_inside_it)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_kill_and_resume_from_an_older_iteration_leaves_no_discarded_weights(mcore, tmp_path, case, caplog):
    """Train to 6 (saves every 2) and get killed, then resume from iteration 2 with another
    data order (the discarded future's checkpoints 4 and 6 are saved again).  The run keeps
    its identity from the state saved in iter_0000002 whatever exports exist, and after the
    resumed run every export inside an iter_N holds exactly iter_N's weights."""
    kw = RESUME_CASES[case]
    save = tmp_path / "ckpt"
    if case == "resume_export_failed":
        (save / "iter_0000002").mkdir(parents=True)
        (save / "iter_0000002" / "hf").write_text("in the way")
    cb, loop, _, _ = run(tmp_path, async_save=False, train_iters=8, kill_at=6, **kw)
    assert loop.killed
    assert (save / "iter_0000004" / "hf").is_dir() and (save / "iter_0000006" / "hf").is_dir()  # the future to discard
    first_id = cb.scheduler.run_id
    if case == "resume_export_failed":
        (save / "iter_0000002" / "hf").unlink()
    model = build_gpt(SPEC, seed=77)
    load_saved_weights(model, save, 2)
    cb2, _, _, _ = run(tmp_path, async_save=case == "keep_all", train_iters=6, start=2, model=model, seed=1, **kw)
    assert cb2.failed == 0, caplog.text
    want = {"keep_last_2": [4, 6], "keep_all": [2, 4, 6], "resume_export_failed": [2, 4, 6]}[case]
    present = [n for n in (2, 4, 6) if (save / f"iter_{n:07d}" / "hf").exists()]
    assert present == want
    for n in present:
        export = save / f"iter_{n:07d}" / "hf"
        assert verify_export(export) == []
        assert_export_holds_checkpoint(export, save, n, tmp_path)
    for n in (4, 6):
        assert read_manifest(save / f"iter_{n:07d}" / "hf")["run_id"] == cb2.scheduler.run_id
    # the identity came from the state saved in iter_0000002
    assert cb2.scheduler.run_id == first_id
    assert read_run_state(save / "iter_0000002")["run_id"] == first_id


def test_export_never_recreates_a_rotated_checkpoint_dir(mcore, tmp_path, caplog):
    """A checkpoint rotated away before its export starts: the export is refused, naming the
    gone directory, and ``iter_N/`` does not come back holding only ``hf/``."""
    import shutil

    class Rotate:  # deletes iter_2 as its checkpoint is confirmed, before the export callback runs
        def on_checkpoint_save(self, ctx):
            if read_tracker(ctx.state.cfg.checkpoint.save) == 2:
                shutil.rmtree(Path(ctx.state.cfg.checkpoint.save) / "iter_0000002")

    cb, _, save, _ = run(tmp_path, async_save=False, train_iters=4, before=[Rotate()])
    assert not (save / "iter_0000002").exists()
    assert cb.failed == 1 and [e["step"] for e in cb.exports] == [4]
    assert "iter_0000002 no longer exists" in caplog.text


def test_staging_dir_never_creates_its_parent_inside_a_checkpoint(tmp_path):
    from nemo_export_hooks.publish import make_staging_dir

    with pytest.raises(FileNotFoundError, match="iter_0000002 does not exist"):
        make_staging_dir(tmp_path / "iter_0000002" / "hf", create_parent=False)
    assert not (tmp_path / "iter_0000002").exists()
    assert make_staging_dir(tmp_path / "a" / "hf").parent == tmp_path / "a"  # elsewhere it is created


def test_dirpath_gets_latest_and_its_staging_leftovers_cleaned(mcore, tmp_path):
    """``dirpath`` overrides the inside placement: ``latest`` is made there, and what a
    crashed export left in it is cleaned at start."""
    d = tmp_path / "D"
    stale = d / ".hf-00002.staging-0123abcd"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"x")
    cb, _, _, _ = run(tmp_path, async_save=False, train_iters=4, dirpath=str(d), filename="hf-{step:05d}")
    assert [e["path"] for e in cb.exports] == [str(d / "hf-00002"), str(d / "hf-00004")]
    assert not stale.exists()
    assert (d / "latest").resolve() == (d / "hf-00004").resolve()
    assert (d / "latest.txt").read_text() == "hf-00004\n"


def test_recipe_switch():
    assert bridge_callbacks({"hf_export": {"enabled": False, "arch": ARCH}}) == []
    (cb,) = bridge_callbacks({"hf_export": {"enabled": True, "arch": ARCH, "keep_last_k": 2}})
    assert isinstance(cb, HFExportBridgeCallback) and cb.config.keep_last_k == 2
    with pytest.raises(ValueError, match="unknown arch"):
        bridge_callbacks({"hf_export": {"enabled": True, "arch": "gpt5"}})


@pytest.mark.dist
def test_two_ranks_async(mcore, tmp_path):
    """The adapter's collectives on two gloo ranks (tests/dist/bridge_ranks.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import torchrun

    rc, log = torchrun(2, [str(tmp_path), "async"], tmp_path / "log.txt", program="bridge_ranks.py")
    assert rc == 0, log[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world"] == 2 and res["failed"] == 0 and [e["step"] for e in res["exports"]] == [2, 4, 6]
    # the resumed run (from iteration 2, whose export retention deleted): one identity on
    # both ranks, the first run's; the export of 2 (pending in the saved state, gone) is
    # redone from the restored weights, those of 4 and 6 replace the discarded ones, and
    # retention (keep 2) removes 2 again
    r = res["resumed"]
    assert r["failed"] == 0 and r["run_ids"] == [r["first_run_id"]] * 2 and [e["step"] for e in r["exports"]] == [2, 4, 6]
    save = tmp_path / "ckpt"
    assert not (save / "iter_0000002" / "hf").exists()
    for e in r["exports"][1:]:
        assert verify_export(e["path"]) == []
        assert_export_holds_checkpoint(Path(e["path"]), save, e["step"], tmp_path)


def test_export_waiting_for_the_latest_lock_is_not_reported_as_being_written(mcore, tmp_path, caplog):
    """Issue 24, item 8, async writes: another process holds the lock on the export
    directory.  The export of 2 is published and waits for it to update ``latest``; the
    skipped export of 4 says so (not "still being written"); once the lock is free, 6 runs."""
    import logging
    import time

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_publish import _HeldLock

    hf = tmp_path / "ckpt" / "hf"
    hf.mkdir(parents=True)
    lock = _HeldLock(hf)

    class Gate:  # runs before the export callback; synchronises on the writer's state, not on time
        def on_checkpoint_save(self, ctx):
            if read_tracker(ctx.state.cfg.checkpoint.save) == 4:
                deadline = time.monotonic() + 120
                while "waiting for the lock" not in getattr(self.export_cb.scheduler.inflight, "phase", ""):
                    assert time.monotonic() < deadline, "the export of step 2 never reached the latest lock"
                    time.sleep(0.01)

        def on_train_step_start(self, ctx):
            if ctx.state.train_state.step == 4:  # after the skip: free the lock, let the export of 2 end
                lock.release()
                job, deadline = self.export_cb.scheduler.inflight, time.monotonic() + 120
                while job is not None and not job.future.done():
                    assert time.monotonic() < deadline, "the export of step 2 did not end once the lock was free"
                    time.sleep(0.01)

    try:
        with caplog.at_level(logging.INFO, logger="nemo_export_hooks"):
            cb, _, save, _ = run(tmp_path, async_save=False, train_iters=6, placement="subdir", on_busy="skip", before=[Gate()])
    finally:
        lock.release()
    assert [e["step"] for e in cb.exports] == [2, 6] and cb.skipped == 1 and cb.failed == 0
    assert f"waiting for the lock on {hf} to point latest at iter_0000002" in caplog.text
    assert (f"skipped the export of step 4: the export of step 2 is published at {hf / 'iter_0000002'} and is waiting for the lock "
            f"another process holds on {hf} to update the latest pointer there") in caplog.text
    assert "still being written" not in caplog.text
    assert (hf / "latest").resolve() == (hf / "iter_0000006").resolve()


def test_a_damaged_saved_state_is_ignored_with_a_warning(mcore, tmp_path, caplog):
    """A state file that is not what the callback writes: a warning, the identity is taken
    from the resumed iteration's export instead, training goes on."""
    cb, _, save, _ = run(tmp_path, async_save=False, train_iters=4)
    (save / "iter_0000002" / "hf_export_state.json").write_text(json.dumps({"run_id": "x", "iteration": 2, "exported_steps": ["two"]}))
    model = build_gpt(SPEC, seed=77)
    load_saved_weights(model, save, 2)
    cb2, _, _, _ = run(tmp_path, async_save=False, train_iters=4, start=2, model=model, seed=1)
    assert "ignoring the export state saved in iteration 2's checkpoint" in caplog.text
    assert cb2.failed == 0 and cb2.scheduler.run_id == cb.scheduler.run_id
    assert [e["step"] for e in cb2.exports] == [4]
