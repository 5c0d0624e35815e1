"""Staging, atomic publish, manifest, verify, latest pointer and retention."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nemo_export_hooks import publish as P
from nemo_export_hooks.exporter.writer import ShardWriter, finalize_shards


def make_export(final_dir: Path, seed: int = 0, overwrite: bool = False, limit: int = 64, **meta) -> Path:
    """A tiny but complete export, made the way the exporter does it."""
    staging = P.make_staging_dir(final_dir)
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(staging, limit, prefix="rank00000", layout=[(f"model.layers.{i}.weight", torch.float32, (3, 4)) for i in range(5)])
    for i in range(5):
        w.add(f"model.layers.{i}.weight", torch.randn(3, 4, generator=g))
    finalize_shards(staging, w.close(), total_size=w.total_bytes)
    (staging / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "seed": seed}))
    P.write_manifest(staging, {"step": seed, **meta})
    return P.publish(staging, final_dir, overwrite=overwrite)


def verify_files(path: Path) -> list:
    """``verify_export`` without the config check: these exports hold placeholder tensors
    (``model.layers.{i}.weight``) no transformers model has; the config check is
    tests/test_cli_verify.py's."""
    return P.verify_export(path, load_config=False)


def tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- staging ------------------------------------------------------------------------------
def test_make_staging_dir_is_hidden_sibling(tmp_path):
    final = tmp_path / "ckpts" / "hf-step100"
    s = P.make_staging_dir(final)
    assert s.is_dir() and s.parent == final.parent
    assert s.name.startswith(".hf-step100.staging-") and len(s.name) == len(".hf-step100.staging-") + 8
    assert P.is_staging_name(s.name)
    assert P.make_staging_dir(final) != s  # unique per call
    assert not final.exists()


def test_make_staging_dir_bad_parent_names_path(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OSError) as ei:
        P.make_staging_dir(blocker / "export")
    assert str(blocker) in str(ei.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_make_staging_dir_unwritable_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=str(parent)):
            P.make_staging_dir(parent / "export")
    finally:
        parent.chmod(0o755)


def test_clean_stale_staging_removes_only_ours(tmp_path):
    stale = [P.make_staging_dir(tmp_path / "a"), P.make_staging_dir(tmp_path / "b.c")]
    (stale[0] / "part.safetensors").write_bytes(b"junk")
    trash = tmp_path / P.trash_name("old")
    trash.mkdir()
    keep = {
        "real-export": "dir",
        ".hidden": "dir",
        ".x.staging-notahex!": "dir",
        ".x.staging-0123456": "dir",  # 7 hex digits
        "y.staging-01234567": "dir",  # not hidden
        ".z.staging-01234567": "file",  # matches but is a file
    }
    for name, kind in keep.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("keep")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    (tmp_path / ".w.staging-89abcdef").symlink_to(target, target_is_directory=True)

    removed = P.clean_stale_staging(tmp_path)
    assert sorted(removed) == sorted(stale + [trash])
    assert not any(p.exists() for p in removed)
    for name in keep:
        assert (tmp_path / name).exists(), name
    assert (target / "precious").read_text() == "keep"
    assert (tmp_path / ".w.staging-89abcdef").is_symlink()
    assert P.clean_stale_staging(tmp_path / "missing") == []


def test_clean_stale_staging_min_age_skips_fresh(tmp_path):
    s = P.make_staging_dir(tmp_path / "a")
    assert P.clean_stale_staging(tmp_path, min_age_s=3600) == []
    assert s.exists()
    os.utime(s, (0, 0))
    assert P.clean_stale_staging(tmp_path, min_age_s=3600) == [s]


# -- manifest -----------------------------------------------------------------------------
def test_write_manifest_records_sizes_and_hashes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    big = os.urandom(3 * 2**20 + 17)  # spans several 1 MiB chunks
    (tmp_path / "sub" / "b.bin").write_bytes(big)
    m = P.write_manifest(tmp_path, {"step": 7, "arch": "llama"})
    on_disk = json.loads((tmp_path / P.MANIFEST_NAME).read_text())
    assert on_disk == m
    assert m["step"] == 7 and m["arch"] == "llama"
    assert m["files"] == {
        "a.bin": {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        "sub/b.bin": {"bytes": len(big), "sha256": hashlib.sha256(big).hexdigest()},
    }
    assert m["producer"]["name"] == "nemo-export-hooks" and m["producer"]["version"]
    assert m["created_utc"].endswith("Z")
    # rewriting does not list the manifest itself
    assert P.MANIFEST_NAME not in P.write_manifest(tmp_path, {})["files"]


def test_write_manifest_rejects_bad_meta(tmp_path):
    with pytest.raises(ValueError, match="files"):
        P.write_manifest(tmp_path, {"files": {}})
    with pytest.raises(ValueError, match="'obj'"):
        P.write_manifest(tmp_path, {"obj": object()})
    assert not (tmp_path / P.MANIFEST_NAME).exists()


# -- publish ------------------------------------------------------------------------------
def test_publish_moves_staging_into_place(tmp_path):
    final = make_export(tmp_path / "hf-1")
    assert final.is_dir()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging gone
    assert P.is_our_export(final)
    assert verify_files(final) == []


def test_publish_refuses_existing_without_overwrite(tmp_path):
    final = make_export(tmp_path / "hf-1", seed=1)
    before = tree(final)
    with pytest.raises(FileExistsError, match="hf-1"):
        make_export(final, seed=2)
    assert tree(final) == before


def test_publish_refuses_foreign_dir_even_with_overwrite(tmp_path):
    foreign = tmp_path / "hf-1"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"user data")
    (foreign / P.MANIFEST_NAME).write_text(json.dumps({"producer": {"name": "someone-else"}}))
    before = tree(foreign)
    staging = P.make_staging_dir(foreign)
    (staging / "x").write_text("new")
    P.write_manifest(staging, {})
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        P.publish(staging, foreign, overwrite=True)
    assert tree(foreign) == before
    assert staging.is_dir()  # caller decides what to do with it

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError):
        P.publish(staging, empty, overwrite=True)
    assert empty.is_dir()


def test_publish_overwrite_replaces_our_export(tmp_path):
    final = make_export(tmp_path / "hf-1", seed=1)
    old_cfg = json.loads((final / "config.json").read_text())
    make_export(final, seed=2, overwrite=True)
    assert json.loads((final / "config.json").read_text())["seed"] == 2 != old_cfg["seed"]
    assert verify_files(final) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-1"]  # no trash or staging left


def test_publish_refuses_symlink_target(tmp_path):
    real = make_export(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    staging = P.make_staging_dir(link)
    (staging / "x").write_text("x")
    with pytest.raises(FileExistsError):
        P.publish(staging, link, overwrite=True)
    assert link.is_symlink() and verify_files(real) == []


def test_publish_to_dangling_symlink_says_symlink(tmp_path):
    """Issue 15, item 5: not "already exists (pass overwrite=True ...)"."""
    link = tmp_path / "hf"
    link.symlink_to(tmp_path / "gone")
    staging = P.make_staging_dir(link)
    with pytest.raises(FileExistsError, match=r"hf is a symlink \(to .*gone\); the rename would replace the link"):
        P.publish(staging, link)
    assert link.is_symlink() and staging.is_dir()


# -- verify -------------------------------------------------------------------------------
def _shard(final):
    return sorted(final.glob("model-*.safetensors"))[0]


def test_verify_detects_one_flipped_byte(tmp_path):
    final = make_export(tmp_path / "hf")
    shard = _shard(final)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_files(final)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]


def test_verify_detects_missing_and_truncated_and_extra(tmp_path):
    final = make_export(tmp_path / "hf")
    shards = sorted(final.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-4])
    save_file({"x": torch.zeros(1)}, str(final / "extra.safetensors"))
    text = "\n".join(verify_files(final))
    assert f"{shards[0].name}: listed in the manifest but missing" in text
    assert f"{shards[0].name}, which does not exist" in text  # index names a missing file
    assert f"{shards[1].name}: size is" in text
    assert "extra.safetensors: safetensors file not listed in the manifest" in text


def test_verify_detects_index_key_not_in_shard(tmp_path):
    final = make_export(tmp_path / "hf")
    index_path = final / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = _shard(final).name
    index_path.write_text(json.dumps(index))
    P.write_manifest(final, {})  # manifest consistent again: only the index is wrong
    problems = verify_files(final)
    assert len(problems) == 1 and "model.ghost.weight" in problems[0]


def test_verify_manifest_and_config_problems(tmp_path):
    final = make_export(tmp_path / "hf")
    (final / "config.json").write_text("{not json")
    P.write_manifest(final, {})
    assert any("config.json is not valid JSON" in p for p in verify_files(final))
    (final / "config.json").unlink()
    P.write_manifest(final, {})
    assert verify_files(final) == ["config.json is missing"]
    (final / P.MANIFEST_NAME).write_text("{broken")
    assert any("export_manifest.json is not valid JSON" in p for p in verify_files(final))
    (final / P.MANIFEST_NAME).unlink()
    assert "export_manifest.json is missing" in verify_files(final)
    assert verify_files(tmp_path / "nope") == [f"{tmp_path / 'nope'} is not a directory"]


# -- latest and retention -----------------------------------------------------------------
def test_update_latest_points_to_newest(tmp_path):
    a = make_export(tmp_path / "hf-step100")
    P.update_latest(tmp_path, a)
    b = make_export(tmp_path / "hf-step200")
    P.update_latest(tmp_path, b)
    link = tmp_path / "latest"
    assert link.is_symlink() and os.readlink(link) == "hf-step200"  # relative
    assert link.resolve() == b.resolve()
    assert (tmp_path / "latest.txt").read_text().strip() == "hf-step200"
    assert verify_files(link) == []
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(ValueError):
        P.update_latest(tmp_path / "hf-step100", b)


def test_update_latest_never_moves_to_an_older_step(tmp_path):
    """Issue 15, item 6: two runs sharing a directory; the one publishing last has the older step."""
    a = make_export(tmp_path / "run-a-step5", seed=5)
    b = make_export(tmp_path / "run-b-step3", seed=3)
    assert P.update_latest(tmp_path, a) is True
    assert P.update_latest(tmp_path, b) is False
    assert os.readlink(tmp_path / "latest") == "run-a-step5" and (tmp_path / "latest.txt").read_text() == "run-a-step5\n"
    c = make_export(tmp_path / "run-b-step7", seed=7)
    assert P.update_latest(tmp_path, c) is True and os.readlink(tmp_path / "latest") == "run-b-step7"
    # the same step again (a re-export) and a target that has gone both move it
    d = make_export(tmp_path / "run-a-step7", seed=7)
    assert P.update_latest(tmp_path, d) is True
    import shutil

    shutil.rmtree(d)
    assert P.update_latest(tmp_path, b) is True and os.readlink(tmp_path / "latest") == "run-b-step3"


def test_update_latest_refuses_real_directory_named_latest(tmp_path):
    a = make_export(tmp_path / "hf-1")
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "user-file").write_text("keep")
    with pytest.raises(FileExistsError):
        P.update_latest(tmp_path, a)
    assert (tmp_path / "latest" / "user-file").read_text() == "keep"


def test_apply_retention_keeps_newest_and_foreign(tmp_path):
    owned = [make_export(tmp_path / f"hf-{i}", seed=i) for i in range(5)]
    # a user replaced hf-1 with their own directory: retention must not touch it
    import shutil

    shutil.rmtree(owned[1])
    owned[1].mkdir()
    (owned[1] / "notes.txt").write_text("mine")
    removed = P.apply_retention(owned, keep_last_k=2)
    assert removed == [owned[0], owned[2]]
    assert [p.exists() for p in owned] == [False, True, False, True, True]
    assert (owned[1] / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if P.is_trash_name(p.name)]
    # the newest always survives
    assert P.apply_retention(owned[3:], keep_last_k=1) == [owned[3]]
    assert owned[4].exists() and verify_files(owned[4]) == []


def test_apply_retention_spares_a_users_copy_with_extra_files(tmp_path):
    """Issue 15, item 3: hf-3 was moved aside and a user's copy of another export of this run
    (its manifest included) put under the name, with the user's own notes file."""
    import shutil

    owned = [make_export(tmp_path / f"hf-{i}", seed=i, run_id="run-a") for i in range(5)]
    os.rename(owned[3], tmp_path / "moved-aside")
    shutil.copytree(owned[1], owned[3])
    (owned[3] / "USER_NOTES.txt").write_text("mine")
    removed = P.apply_retention(owned, keep_last_k=1)
    assert removed == [owned[0], owned[1], owned[2]]
    assert (owned[3] / "USER_NOTES.txt").read_text() == "mine" and P.read_manifest(owned[3])["step"] == 1
    assert P.deletable_export(owned[3]) == "it holds USER_NOTES.txt, which is not in its manifest"


def test_apply_retention_checks_run_and_step(tmp_path):
    """A copy that is exactly an export (no extra file) is still spared when it is not the
    export this run made at that path: another step, or another run's."""
    import shutil

    owned = [make_export(tmp_path / f"hf-{i}", seed=i, run_id="run-a") for i in range(4)]
    shutil.rmtree(owned[1])
    shutil.copytree(owned[0], owned[1])  # step 0's export under step 1's name
    shutil.rmtree(owned[2])
    make_export(owned[2], seed=2, run_id="run-b")  # another run's export of step 2
    expect = {str(p): {"step": i} for i, p in enumerate(owned)}
    removed = P.apply_retention(owned, keep_last_k=1, run_id="run-a", expect=expect)
    assert removed == [owned[0]]
    assert owned[1].exists() and owned[2].exists() and owned[3].exists()
    assert P.deletable_export(owned[1], {"step": 1}) == "its manifest says step=0, this run's export has step=1"
    assert P.deletable_export(owned[2], {"run_id": "run-a"}) == "its manifest says run_id='run-b', this run's export has run_id='run-a'"


def test_deletable_export_refuses_changed_contents(tmp_path):
    d = make_export(tmp_path / "hf", seed=0)
    assert P.deletable_export(d) is None
    (d / "sub").mkdir()
    assert P.deletable_export(d) == "it holds sub/, which is not in its manifest"
    (d / "sub").rmdir()
    (d / ".hidden").write_text("x")
    assert P.deletable_export(d) == "it holds .hidden, which is not in its manifest"
    (d / ".hidden").unlink()
    m = json.loads((d / P.MANIFEST_NAME).read_text())
    m["step"] = 7
    (d / P.MANIFEST_NAME).write_text(json.dumps(m))
    assert P.deletable_export(d) == f"its {P.MANIFEST_NAME} was modified"


@pytest.mark.parametrize("k", [None, 0, -3, 5])
def test_apply_retention_keep_all(tmp_path, k):
    owned = [make_export(tmp_path / f"hf-{i}", seed=i) for i in range(3)]
    assert P.apply_retention(owned, keep_last_k=k) == []
    assert all(p.exists() for p in owned)


class _HeldLock:
    """``flock`` on a directory, held by this test as another process would (a second open
    file description conflicts like another process)."""

    def __init__(self, d: Path):
        import fcntl

        self.fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def test_latest_lock_wait_is_logged_bounded_and_named(tmp_path, caplog):
    """Issue 24, item 8: another process holds the lock: a log line says what is waited for,
    the wait ends after its bound with an error naming the directory, latest is unchanged."""
    import logging

    a = make_export(tmp_path / "hf-step100")
    P.update_latest(tmp_path, a)
    b = make_export(tmp_path / "hf-step200")
    lock = _HeldLock(tmp_path)
    waited = []
    try:
        with caplog.at_level(logging.INFO, logger="nemo_export_hooks"):
            with pytest.raises(TimeoutError, match=rf"gave up waiting for the lock on {tmp_path} to point latest at hf-step200 after 0\.\d s: another process holds it"):
                P.update_latest(tmp_path, b, lock_timeout_s=0.2, on_wait=lambda: waited.append(1))
    finally:
        lock.release()
    assert waited == [1]
    assert f"waiting for the lock on {tmp_path} to point latest at hf-step200: another process holds it" in caplog.text
    assert os.readlink(tmp_path / "latest") == "hf-step100"
    assert P.update_latest(tmp_path, b) and os.readlink(tmp_path / "latest") == "hf-step200"  # free again
