"""Fault injection on CPU: an exporter that runs inside training must never publish garbage.

* SIGKILL of the whole job (a Lightning run exporting every step, async and sync) and of
  one rank of a two-rank export (EP=2, gloo), at random points: exact points (the k-th
  filesystem operation, k random) and random times.  After every kill: every published
  directory verifies against its manifest, ``latest`` points at a complete export, the
  training checkpoint beside the exports is untouched; the next run cleans the leftovers
  and exports normally.
* Disk full: a tmpfs of limited size (root only; skipped otherwise) and an OS-level write
  failure (RLIMIT_FSIZE, works everywhere): a clear error, no staging left, training goes on
  (``fail_on_error=false``) or stops with the error (``true``).
* Permission denied (as an unprivileged user: root ignores permissions), an output path
  inside a training checkpoint, templates and symlinks escaping the export directory, a
  second run sharing the directory: clear errors, nothing overwritten that the callback did
  not create.
* Retention never deletes the newest complete export nor anything it did not create.
* ``nemo-export-hooks verify`` fails on one corrupted byte anywhere.

Trials run in children forked from ``tests/faults/zygote.py`` (imports paid once), so 20
kills cost seconds.  ``FAULT_SEED`` changes the random points (they are printed on failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nemo_export_hooks import publish as P

ROOT = Path(__file__).resolve().parents[1]
ZYGOTE = ROOT / "tests" / "faults" / "zygote.py"
SEED = int(os.environ.get("FAULT_SEED", "20240601"))
KILL_TRIALS = int(os.environ.get("FAULT_KILL_TRIALS", "20"))
RANK_KILL_TRIALS = int(os.environ.get("FAULT_RANK_KILL_TRIALS", "8"))
SIGKILL = -9


# -- the fork server ---------------------------------------------------------------------------
class Zygote:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONWARNINGS="ignore")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], cwd=str(ROOT), env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._read(timeout_s=180)
        self.n = 0

    def _read(self, timeout_s: float) -> dict:
        import select

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"fault zygote exited with {self.proc.poll()}")
                if line.startswith("{"):
                    return json.loads(line)
        raise TimeoutError("fault zygote did not answer")

    def run(self, scenario: str, d: Path, work_root: Path, args: dict | None = None, **kw) -> "Outcome":
        self.n += 1
        work = work_root / f"w{self.n:03d}"
        cmd = {"scenario": scenario, "dir": str(d), "work": str(work), "args": args or {}, **kw}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout_s=float(kw.get("timeout_s", 120)) + 30)
        assert "error" not in reply, reply
        return Outcome(reply, work, cmd)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


class Outcome:
    def __init__(self, reply: dict, work: Path, cmd: dict):
        self.exit = reply["exit"]
        self.seconds = reply["seconds"]
        self.work = work
        self.cmd = cmd

    def result(self, rank: int = 0) -> dict:
        p = self.work / f"rank{rank}.json"
        assert p.exists(), f"rank {rank} left no result (exit {self.exit}); log:\n{self.log(rank)[-4000:]}"
        return json.loads(p.read_text())

    def started(self) -> dict | None:
        p = self.work / "started.json"
        return json.loads(p.read_text()) if p.exists() else None

    def log(self, rank: int = 0) -> str:
        p = self.work / f"rank{rank}.log"
        return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    return w


# -- checks ------------------------------------------------------------------------------------
CKPT_FILE = "epoch=0-step=0.ckpt"
CKPT_DIR = "model-step=0"  # a NeMo-style (directory) checkpoint


def make_training_checkpoint(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    (d / CKPT_FILE).write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    (d / CKPT_DIR / "weights").mkdir(parents=True)
    (d / CKPT_DIR / "context").mkdir()
    (d / CKPT_DIR / "weights" / "__0_0.distcp").write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    (d / CKPT_DIR / "weights" / "metadata.json").write_text("{}")
    (d / CKPT_DIR / "context" / "io.json").write_text('{"model": "tiny"}')
    return checkpoint_state(d)


def checkpoint_state(d: Path) -> dict:
    out = {}
    for p in [d / CKPT_FILE, *sorted((d / CKPT_DIR).rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_mode, st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
    return out


def published(d: Path) -> list[Path]:
    """Everything that looks published: non-hidden directories but the checkpoint."""
    return sorted(p for p in d.iterdir() if not p.name.startswith(".") and p.name != CKPT_DIR and p.is_dir() and not p.is_symlink())


def invariant_problems(d: Path, ckpt: dict | None) -> list[str]:
    problems = []
    for p in published(d):
        problems += [f"{p.name}: {x}" for x in P.verify_export(p)]
    link = d / "latest"
    if os.path.lexists(link):
        target = link.resolve()
        if target.parent != d.resolve() or not target.is_dir():
            problems.append(f"latest -> {os.readlink(link)} is not an export in {d}")
        elif P.verify_export(target):
            problems.append(f"latest -> {target.name} does not verify")
    if (d / "latest.txt").exists():
        name = (d / "latest.txt").read_text().strip()
        if not (d / name).is_dir():
            problems.append(f"latest.txt names {name!r}, which does not exist")
    if ckpt is not None and checkpoint_state(d) != ckpt:
        problems.append("the training checkpoint changed")
    return problems


def hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def train_args(tag: str, d: Path, max_steps: int, seed: int = 1234, **cb) -> dict:
    callback = dict(dirpath=str(d), filename=f"{tag}-{{step}}", on_checkpoint_save=False, every_n_train_steps=1,
                    on_busy="wait", keep_last_k=2, max_shard_size="40KB")
    callback.update(cb)
    return {"max_steps": max_steps, "seed": seed, "callback": callback}


# -- SIGKILL ----------------------------------------------------------------------------------
def test_sigkill_whole_job_at_random_points(zygote, tmp_path, work):
    d = tmp_path / "checkpoints"
    ckpt = make_training_checkpoint(d)
    # calibration: a normal run, counting the filesystem operations of its exports
    cal = zygote.run("train", d, work, train_args("cal", d, 3), count_events=True)
    res = cal.result()
    assert cal.exit == [0] and res["exports"] == [1, 2, 3] and res["failed"] == 0, (res, cal.log())
    per_export = max(10, res["events"] // 3)
    assert invariant_problems(d, ckpt) == []

    rng = random.Random(SEED)
    log = []
    left_behind = 0
    for i in range(KILL_TRIALS):
        async_write = i % 4 != 3  # mostly async (background thread), some sync
        args = train_args(f"t{i:02d}", d, 100000, async_write=async_write)
        if i % 2 == 0:
            at = rng.randint(1, 3 * per_export)
            how = {"event_kill": {"rank": 0, "at": at}}
            what = f"trial {i}: SIGKILL at filesystem op {at} ({'async' if async_write else 'sync'})"
        else:
            after = round(rng.uniform(0.0, 0.8), 3)
            how = {"kill": {"rank": 0, "after_started_s": after}}
            what = f"trial {i}: SIGKILL {after} s into training ({'async' if async_write else 'sync'})"
        out = zygote.run("train", d, work, args, timeout_s=60, **how)
        log.append(what)
        assert out.exit == [SIGKILL], f"{what}: the job was not killed: {out.exit}\n{out.log()[-3000:]}"
        started = out.started()
        assert started is not None, f"{what}: killed before training started\n{out.log()[-3000:]}"
        # the previous kill's leftovers were cleaned before this run's first step
        assert started["hidden"] == [], f"{what}: leftovers not cleaned at start: {started['hidden']}"
        problems = invariant_problems(d, ckpt)
        assert problems == [], f"{what} (seed {SEED}):\n" + "\n".join(problems)
        left_behind += bool(hidden(d))

    # the next run cleans what the last kill left and exports normally
    final = zygote.run("train", d, work, train_args("final", d, 3))
    res = final.result()
    assert final.exit == [0] and res["exports"] == [1, 2, 3] and res["failed"] == 0, (res, final.log())
    assert final.started()["hidden"] == []
    assert hidden(d) == [], hidden(d)
    assert invariant_problems(d, ckpt) == []
    assert sorted(p.name for p in published(d) if p.name.startswith("final-")) == ["final-2", "final-3"]
    # the random points did hit exports in flight (a staging directory or temporary left behind)
    assert left_behind >= KILL_TRIALS // 5, (left_behind, log)
    print(f"\n{KILL_TRIALS} whole-job kills (seed {SEED}); {left_behind} left export leftovers, all cleaned by the next run")


def test_sigkill_one_rank_of_two(zygote, tmp_path, work):
    d = tmp_path / "exports"
    ckpt = make_training_checkpoint(d)
    cal = zygote.run("export_loop", d, work, {"tag": "cal", "n": 2}, ranks=2, ep=2, count_events=True)
    assert cal.exit == [0, 0], (cal.exit, cal.log(0)[-2000:], cal.log(1)[-2000:])
    assert [cal.result(r)["done"] for r in (0, 1)] == [[0, 1], [0, 1]]
    per_export = max(10, max(cal.result(r)["events"] for r in (0, 1)) // 2)
    assert invariant_problems(d, ckpt) == []

    rng = random.Random(SEED + 1)
    for i in range(RANK_KILL_TRIALS):
        victim = rng.randint(0, 1)
        args = {"tag": f"r{i:02d}", "n": 1000}
        if i % 2 == 0:
            at = rng.randint(1, 3 * per_export)
            how = {"event_kill": {"rank": victim, "at": at}}
            what = f"trial {i}: rank {victim} SIGKILLed at its filesystem op {at}"
        else:
            after = round(rng.uniform(0.0, 0.6), 3)
            how = {"kill": {"rank": victim, "after_started_s": after}}
            what = f"trial {i}: rank {victim} SIGKILLed {after} s in"
        out = zygote.run("export_loop", d, work, args, ranks=2, ep=2, grace_s=2, dist_timeout_s=10, timeout_s=60, **how)
        assert out.exit[victim] == SIGKILL, f"{what}: {out.exit}"
        started = out.started()
        assert started is not None and started["hidden"] == [], f"{what}: leftovers not cleaned at start: {started}"
        problems = invariant_problems(d, ckpt)
        assert problems == [], f"{what} (seed {SEED}):\n" + "\n".join(problems)

    final = zygote.run("export_loop", d, work, {"tag": "final", "n": 2}, ranks=2, ep=2)
    assert final.exit == [0, 0], (final.log(0)[-2000:], final.log(1)[-2000:])
    assert final.started()["hidden"] == []
    assert hidden(d) == []
    assert invariant_problems(d, ckpt) == []
    assert (d / "latest").resolve().name == "final-001"


# -- disk full ---------------------------------------------------------------------------------
def _export_bytes(zygote, tmp_path, work) -> int:
    d = tmp_path / "size-probe"
    out = zygote.run("train", d, work, train_args("probe", d, 1, max_shard_size="5GB"))
    assert out.exit == [0], out.log()
    e = d / "probe-1"
    return sum(p.stat().st_size for p in e.rglob("*") if p.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of a given size mounted by the test (root only)."""
    mounts = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root")
        m = tmp_path / f"tmpfs{len(mounts)}"
        m.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(m)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the RLIMIT_FSIZE test covers disk full")
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


@pytest.mark.parametrize("fail_on_error", [False, True], ids=["continue", "stop"])
def test_disk_full_tmpfs(zygote, tmp_path, work, small_tmpfs, fail_on_error):
    size = _export_bytes(zygote, tmp_path, work)
    d = small_tmpfs(int(size * 1.6) // 4096 * 4096)  # room for one export, not two
    out = zygote.run("train", d, work, train_args("full", d, 4, keep_last_k=None, fail_on_error=fail_on_error, max_shard_size="5GB"))
    res = out.result()
    log = out.log() + str(res["error"])
    assert "No space left on device" in log and "HF export of step 2" in log
    assert "cannot write rank00000-00001.safetensors in" in log and ".full-2.staging-" in log  # which file, where
    assert res["exports"] == [1]
    if fail_on_error:
        assert res["error"] and "fail_on_error=true" in res["error"] and "No space left on device" in res["error"]
        assert res["global_step"] < 4
    else:
        assert res["error"] is None and res["global_step"] == 4 and res["failed"] == 3
        assert "training continues" in log
    assert hidden(d) == [], "a staging directory was left on the full disk"
    assert [p.name for p in published(d)] == ["full-1"]
    assert invariant_problems(d, None) == []


@pytest.mark.parametrize("fail_on_error", [False, True], ids=["continue", "stop"])
def test_write_failure_file_size_limit(zygote, tmp_path, work, fail_on_error):
    """An OS-level write failure (RLIMIT_FSIZE: EFBIG) in the middle of a shard file."""
    d = tmp_path / "hf"
    d.mkdir()
    out = zygote.run("train", d, work, train_args("big", d, 3, fail_on_error=fail_on_error, max_shard_size="5GB"), fsize=60_000)
    res = out.result()
    log = out.log()
    assert "File too large" in log and "cannot write rank00000-00001.safetensors" in log, log[-3000:]
    assert res["exports"] == []
    if fail_on_error:
        assert res["error"] and "fail_on_error=true" in res["error"] and "File too large" in res["error"]
        assert res["global_step"] < 3
    else:
        assert res["error"] is None and res["global_step"] == 3 and res["failed"] == 3
    assert hidden(d) == [] and published(d) == []


# -- permissions, paths, second runs -----------------------------------------------------------
def _world_dir(tmp_path: Path, name: str) -> Path:
    """A directory an unprivileged user can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix=f"faults-{name}-", dir="/tmp"))
    os.chmod(base, 0o755)
    return base


@pytest.fixture
def unprivileged(tmp_path):
    """(uid to run as or None, a world-reachable scratch dir).  Root ignores permission bits,
    so as root the child drops to ``nobody``; otherwise it runs as the current user."""
    base = _world_dir(tmp_path, "perm")
    yield (65534 if os.geteuid() == 0 else None), base
    for p in base.rglob("*"):
        try:
            os.chmod(p, 0o755, follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass
    shutil.rmtree(base, ignore_errors=True)


def test_permission_denied_at_setup(zygote, unprivileged):
    uid, base = unprivileged
    d = base / "readonly"
    d.mkdir(mode=0o555)
    if uid is None:
        d.chmod(0o555)
    work = base / "work"
    out = zygote.run("train", d / "hf", work, train_args("p", d / "hf", 2), uid=uid)
    res = out.result()
    assert res["global_step"] == 0 and res["exports"] == []
    assert res["error"] and "PermissionError" in res["error"] and "not writable" in res["error"], res
    assert list(d.iterdir()) == []


def test_permission_lost_mid_run_keeps_training_and_previous_export(zygote, unprivileged):
    uid, base = unprivileged
    d = base / "hf"
    d.mkdir()
    if uid is not None:
        os.chown(d, uid, uid)
    work = base / "work"
    args = train_args("p", d, 4, async_write=False, keep_last_k=None)
    args["chmod_after_exports"] = [1, 0o555]
    out = zygote.run("train", d, work, args, uid=uid)
    res = out.result()
    log = out.log()
    assert res["error"] is None and res["global_step"] == 4, res
    assert res["exports"] == [1] and res["failed"] == 3
    assert "Permission denied" in log or "not writable" in log, log[-3000:]
    assert sorted(p.name for p in d.iterdir()) == ["latest", "latest.txt", "p-1"]
    assert P.verify_export(d / "p-1") == []


def test_output_inside_a_training_checkpoint_is_refused(zygote, tmp_path, work):
    d = tmp_path / "checkpoints"
    ckpt = make_training_checkpoint(d)
    inside = d / CKPT_DIR / "hf"
    out = zygote.run("train", inside, work, train_args("in", inside, 2))
    res = out.result()
    assert checkpoint_state(d) == ckpt
    assert res["error"] and "inside the training checkpoint" in res["error"], res
    assert not inside.exists()


def test_template_cannot_escape_the_export_directory():
    from nemo_export_hooks.callback import HFExportCallback
    from nemo_export_hooks.config import render_filename

    for bad, why in (("../{step}", "escapes"), ("/abs/{step}", "absolute"), ("a/{step}", "separator"),
                     ("..", "escapes"), (".{step}", "hidden"), ("latest", "reserved")):
        with pytest.raises(ValueError, match=why):
            HFExportCallback(arch="qwen3_moe", filename=bad)
    # a checkpoint name cannot smuggle a path either: it is rendered, then checked again
    for ck in ("..", ".hidden"):
        with pytest.raises(ValueError):
            render_filename("{checkpoint}", checkpoint=ck, step=1, epoch=0)


def test_planted_symlink_and_user_directory_are_not_written_through(zygote, tmp_path, work):
    d = tmp_path / "hf"
    d.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (d / "s-1").symlink_to(outside, target_is_directory=True)  # an export name pointing elsewhere
    (d / "s-2").mkdir()
    (d / "s-2" / "user.txt").write_text("mine")  # a user's directory under an export name
    before = {p: p.read_bytes() for p in (outside / "precious.txt", d / "s-2" / "user.txt")}
    out = zygote.run("train", d, work, train_args("s", d, 3, keep_last_k=None))
    res = out.result()
    assert res["error"] is None and res["exports"] == [3] and res["failed"] == 2, res
    log = out.log()
    assert "not an export made by nemo-export-hooks" in log or "refusing" in log or "exists and is not empty" in log, log[-2000:]
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (d / "s-1").is_symlink() and sorted(p.name for p in (d / "s-2").iterdir()) == ["user.txt"]
    assert P.verify_export(d / "s-3") == [] and hidden(d) == []


def test_second_run_cleanup_leaves_a_live_export_alone(zygote, tmp_path, work):
    """Run B starting beside run A's export in flight must not delete A's staging directory."""
    import threading

    d = tmp_path / "shared"
    d.mkdir()
    w = work / "holder"
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(out=zygote.run("hold_staging", d, w, {"name": "a-100"}, timeout_s=90)))
    t.start()
    wdir = None
    deadline = time.time() + 60
    while time.time() < deadline and wdir is None:
        wdir = next((p for p in work.glob("holder/w*/in_flight")), None)
        time.sleep(0.05)
    assert wdir is not None, "the holder never started its export"
    staging = Path(wdir.read_text())
    assert staging.is_dir() and P.is_staging_name(staging.name)
    assert P.staging_in_use(staging)
    assert P.clean_stale_staging(d) == []  # what run B's callback does at its start
    assert staging.is_dir()
    (wdir.parent / "go").write_text("go")
    t.join(90)
    out = box["out"]
    assert out.exit == [0], out.log()
    assert P.verify_export(d / "a-100") == [] and hidden(d) == []


def test_second_run_does_not_overwrite_the_first_runs_exports(zygote, tmp_path, work):
    d = tmp_path / "shared"
    first = zygote.run("train", d, work, train_args("x", d, 2, keep_last_k=None))
    assert first.result()["exports"] == [1, 2]
    before = {p.name: (p / P.MANIFEST_NAME).read_bytes() for p in published(d)}
    second = zygote.run("train", d, work, train_args("x", d, 2, keep_last_k=None, seed=7))
    res = second.result()
    assert res["exports"] == [] and res["failed"] == 2, res
    assert "was not created by this run" in second.log() or "exists" in second.log()
    assert {p.name: (p / P.MANIFEST_NAME).read_bytes() for p in published(d)} == before


# -- retention ---------------------------------------------------------------------------------
def test_retention_keeps_newest_complete_and_foreign(zygote, tmp_path, work):
    d = tmp_path / "hf"
    d.mkdir()
    other = zygote.run("train", d, work, train_args("other", d, 1, keep_last_k=None))
    assert other.result()["exports"] == [1]  # another run's export (ours by manifest)
    (d / "k-1").mkdir()
    (d / "k-1" / "notes.txt").write_text("a user's directory under an export name")
    (d / "k-stray.txt").write_text("a file")
    out = zygote.run("train", d, work, train_args("k", d, 4, keep_last_k=1))
    res = out.result()
    assert res["exports"] == [2, 3, 4] and res["failed"] == 1, res
    names = sorted(p.name for p in d.iterdir())
    assert names == ["k-1", "k-4", "k-stray.txt", "latest", "latest.txt", "other-1"], names
    assert (d / "k-1" / "notes.txt").exists() and P.verify_export(d / "other-1") == []

    # a failed export never costs the newest complete one
    (d / "m-2").mkdir()  # step 2's export will be refused
    (d / "m-2" / "x").write_text("x")
    out = zygote.run("train", d, work, train_args("m", d, 2, keep_last_k=1))
    res = out.result()
    assert res["exports"] == [1] and res["failed"] == 1, res
    # latest stays at the highest step in the directory (k-4, another run's): update_latest
    # never moves it to an older step (m-1), so runs sharing a directory do not fight over it
    assert P.verify_export(d / "m-1") == [] and (d / "latest").resolve().name == "k-4"


def _make_export(final: Path, seed: int) -> Path:
    import torch

    from nemo_export_hooks.exporter.writer import ShardWriter, finalize_shards

    staging = P.make_staging_dir(final)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.weight": torch.randn(3, 4, generator=g) for i in range(3)}
    w = ShardWriter(staging, 64, prefix="rank00000", layout=[(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    for k, t in tensors.items():
        w.add(k, t)
    finalize_shards(staging, w.close(), total_size=w.total_bytes)
    (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
    P.write_manifest(staging, {"step": seed})
    return P.publish(staging, final)


def test_retention_unit_newest_entry_gone_or_replaced(tmp_path):
    owned = [_make_export(tmp_path / f"e-{i}", i) for i in range(4)]
    shutil.rmtree(owned[3])  # the newest entry vanished (or a user replaced it, below)
    assert P.apply_retention(owned, 1) == owned[:2]
    assert owned[2].exists() and P.verify_export(owned[2], load_config=False) == []  # the newest complete export stays
    owned[3].mkdir()
    (owned[3] / "user").write_text("u")
    assert P.apply_retention(owned, 1) == []
    assert (owned[3] / "user").exists() and owned[2].exists()


# -- verify ------------------------------------------------------------------------------------
def test_verify_cli_fails_on_any_corrupted_byte(zygote, tmp_path, work):
    from nemo_export_hooks.cli import main

    d = tmp_path / "hf"
    out = zygote.run("train", d, work, train_args("v", d, 1, max_shard_size="20KB"))
    assert out.result()["exports"] == [1]
    good = d / "v-1"
    cli = Path(sys.executable).with_name("nemo-export-hooks")
    if cli.exists():  # the installed console script, as a user runs it
        r = subprocess.run([str(cli), "verify", str(good)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("OK:") and "config loads in transformers" in r.stdout, r.stdout + r.stderr
    assert main(["verify", str(good)]) == 0

    shards = sorted(good.glob("model-*.safetensors"))
    assert len(shards) > 1
    targets = [(shards[0].name, 4), (shards[0].name, 40), (shards[-1].name, -1), (shards[1].name, shards[1].stat().st_size // 2),
               ("model.safetensors.index.json", 20), ("config.json", 10), ("generation_config.json", 5), (P.MANIFEST_NAME, 30)]
    for i, (name, offset) in enumerate(targets):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        data = bytearray((bad / name).read_bytes())
        data[offset] ^= 0x20
        (bad / name).write_bytes(bytes(data))
        assert main(["verify", str(bad)]) == 1, f"one flipped byte in {name} at {offset} went unnoticed"
        assert main(["verify", "--no-load-config", str(bad)]) == 1
    # truncation, a missing shard, an extra file
    for i, mutate in enumerate((lambda p: shards_of(p)[0].write_bytes(shards_of(p)[0].read_bytes()[:-1]),
                                lambda p: shards_of(p)[-1].unlink(),
                                lambda p: (p / "extra.bin").write_bytes(b"x"))):
        bad = tmp_path / f"mut{i}"
        shutil.copytree(good, bad)
        mutate(bad)
        assert main(["verify", str(bad)]) == 1
    # a config that transformers cannot load (manifest made consistent again): only the load catches it
    cfg = tmp_path / "cfg"
    shutil.copytree(good, cfg)
    c = json.loads((cfg / "config.json").read_text())
    c["model_type"] = "no_such_model"
    (cfg / "config.json").write_text(json.dumps(c))
    meta = {k: v for k, v in json.loads((cfg / P.MANIFEST_NAME).read_text()).items() if k not in ("files", "producer", "created_utc", "manifest_version", "manifest_sha256")}
    P.write_manifest(cfg, meta)
    assert main(["verify", "--no-load-config", str(cfg)]) == 0
    assert main(["verify", str(cfg)]) == 1


def shards_of(p: Path) -> list[Path]:
    return sorted(p.glob("model-*.safetensors"))


# -- the writer's own integrity ---------------------------------------------------------------
def test_streamed_digests_match_the_files_whatever_the_layout(tmp_path):
    """The manifest trusts the sha256 the writer computed while writing (no read-back): it
    must equal the file's, for tensors added in layout order (hashed from memory), in
    another order (hashed back from the page cache), with mixed element sizes, and with
    several writer threads."""
    import torch
    from safetensors.torch import load_file

    from nemo_export_hooks.exporter.writer import ShardWriter, known_digest

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(40, 30, generator=g).to(torch.bfloat16) for i in range(30)}
    mixed = dict(base)
    mixed["model.layers.3.w"] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # odd bytes: sorted after the bf16s
    mixed["model.layers.9.b"] = torch.randn(7, generator=g)  # f32: sorted first
    cases = [(base, False, 1), (base, True, 1), (mixed, False, 1), (mixed, True, 1), (mixed, True, 3)]
    for n, (tensors, backwards, writers) in enumerate(cases):
        d = tmp_path / f"r{n}"
        d.mkdir()
        w = ShardWriter(d, 10_000, prefix="rank00000", layout=[(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                        writers=writers, min_part_bytes=1)
        for k in (reversed(list(tensors)) if backwards else list(tensors)):
            w.add(k, tensors[k])
        w.close()
        loaded = {}
        for f in w.files:
            data = (d / f).read_bytes()
            assert w.digests[f] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, (n, f)
            assert known_digest(d / f) == w.digests[f]["sha256"]
            loaded.update(load_file(str(d / f)))
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())
        assert sorted(p.name for p in d.iterdir()) == sorted(w.files)
    (d / w.files[0]).write_bytes(b"changed")  # a file changed since: its digest is not trusted
    assert known_digest(d / w.files[0]) is None


@pytest.mark.parametrize("writers", [1, 2])
def test_write_error_mid_shard_leaves_no_temporary_file(tmp_path, monkeypatch, writers):
    import errno

    import torch

    from nemo_export_hooks.exporter import writer as W

    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    layout = [(f"t{i}", torch.float32, (50,)) for i in range(20)]
    w = W.ShardWriter(tmp_path, 1000, prefix="rank00003", layout=layout, writers=writers, min_part_bytes=1)
    monkeypatch.setattr(W.os, "pwrite", pwrite)
    with pytest.raises(OSError, match=r"cannot write rank00003-0000\d.safetensors in .*: No space left on device"):
        for i in range(20):
            w.add(f"t{i}", torch.randn(50))
        w.close()  # with writer threads the error may surface only here
    monkeypatch.setattr(W.os, "pwrite", real)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(RuntimeError, match="closed"):
        w.add("again", torch.zeros(1))
