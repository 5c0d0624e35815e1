"""Fork server for the fault-injection tests (``tests/test_faults.py``).

Importing torch, Megatron-Core, Lightning and transformers takes seconds on a 2-core
machine; a fault trial (train a tiny model with the export callback, get SIGKILLed at a
random point) takes a fraction of that.  So this process imports everything once, then
forks one child per rank for every command it reads on stdin, and answers with one JSON
line per command on stdout.  Nothing heavy is initialised before a fork: every child sets up
its own process group (gloo, file store), Megatron's parallel state and its model.

A command (one JSON object per line)::

    {"scenario": "train" | "export_loop" | "hold_staging",
     "ranks": 1, "dir": "...", "work": "...",          # work: logs, stores, results
     "args": {...},                                    # the scenario's arguments
     "kill": {"rank": 0, "after_started_s": 0.4},      # optional: SIGKILL from here
     "event_kill": {"rank": 0, "at": 57},              # optional: the child SIGKILLs itself
                                                       #   at its 57th filesystem operation
     "uid": 65534, "fsize": 100000,                    # optional: drop root / RLIMIT_FSIZE
     "grace_s": 3, "timeout_s": 60}

When one rank of a multi-rank job dies, the others get ``grace_s`` to fail on their own and
are then SIGKILLed, as torchrun does.  The reply: ``{"exit": [code or -signal per rank],
"seconds": ...}``.  Each rank writes ``work/rank{r}.log`` and, if it returns,
``work/rank{r}.json``.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)
import lightning.pytorch as pl  # noqa: E402,F401
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402,F401
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402,F401

import nemo_export_hooks.callback  # noqa: E402,F401
import nemo_export_hooks.exporter.api  # noqa: E402,F401
import nemo_export_hooks.testing.lightning  # noqa: E402,F401
from nemo_export_hooks import publish as P  # noqa: E402
from nemo_export_hooks.exporter import writer as W  # noqa: E402

FS_OPS = ("pwrite", "write", "fsync", "replace", "rename", "mkdir", "symlink", "unlink", "rmdir")


# -- fault injection ------------------------------------------------------------------------
class EventKill:
    """SIGKILL this process at its ``at``-th filesystem operation once armed (os.pwrite,
    os.write, fsync, replace, rename, mkdir, symlink, unlink, rmdir, and open() for writing):
    a kill at an exact, random point of the export path, from whichever thread does it."""

    def __init__(self, at: int):
        self.at = at
        self.count = 0
        self.armed = False

    def tick(self) -> None:
        if self.armed:
            self.count += 1
            if self.count >= self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> "EventKill":
        for name in FS_OPS:
            orig = getattr(os, name)

            def wrapped(*a, __orig=orig, **k):
                self.tick()
                return __orig(*a, **k)

            setattr(os, name, wrapped)
        orig_open = builtins.open

        def opener(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                self.tick()
            return orig_open(file, mode, *a, **k)

        builtins.open = opener
        return self


class EventCount(EventKill):
    """Counts the same operations without killing (calibration)."""

    def __init__(self):
        super().__init__(at=1 << 62)


def hidden_entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


# -- scenarios ------------------------------------------------------------------------------
def scenario_train(rank: int, cmd: dict, events) -> dict:
    """Train TinyMegatronLM with HFExportCallback until max_steps (or until killed)."""
    from nemo_export_hooks.callback import HFExportCallback
    from nemo_export_hooks.testing.lightning import TinyMegatronLM

    a = cmd["args"]
    d = Path(cmd["dir"])
    work = Path(cmd["work"])

    class Started(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            # the export callback (listed first) has cleaned stale leftovers in on_fit_start
            (work / "started.json").write_text(json.dumps({"hidden": hidden_entries(d), "t": time.time()}))
            if events is not None:
                events.armed = True

    class Chmod(pl.Callback):
        """After ``n`` exports, take write permission away from the export directory."""

        def __init__(self, n: int, mode: int):
            self.n, self.mode, self.done = n, mode, False

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.done and len(cb.exports) >= self.n:
                os.chmod(d, self.mode)
                self.done = True

    cb = HFExportCallback(arch="qwen3_moe", dtype="bfloat16", **a.get("callback", {}))
    extra = [Chmod(*a["chmod_after_exports"])] if a.get("chmod_after_exports") else []
    module = TinyMegatronLM(seq_len=16, batch_size=2, seed=a.get("seed", 1234))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=a.get("max_steps", 100000), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, default_root_dir=str(work / "lightning"), callbacks=[cb, Started(), *extra])
    error = None
    try:
        trainer.fit(module)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        error = f"{type(e).__name__}: {e}"
        if e.__cause__ is not None:
            error += f" | cause {type(e.__cause__).__name__}: {e.__cause__}"
    return {"exports": [x["step"] for x in cb.exports], "paths": [x["path"] for x in cb.exports], "failed": cb.failed,
            "skipped": cb.skipped, "global_step": trainer.global_step, "error": error,
            "events": events.count if events is not None else None}


def scenario_export_loop(rank: int, cmd: dict, events) -> dict:
    """Every rank exports an EP=2 model in a loop (what the callback does on a
    checkpoint, without Lightning): rank 0 cleans stale staging first, and after each
    export updates ``latest`` and applies retention (keep 2)."""
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

    a = cmd["args"]
    d = Path(cmd["dir"])
    work = Path(cmd["work"])
    world = cmd["ranks"]
    model = build_gpt(TinySpec(num_layers=2), expert_model_parallel_size=world)
    if rank == 0:
        P.clean_stale_staging(d)
        (work / "started.json").write_text(json.dumps({"hidden": hidden_entries(d), "t": time.time()}))
    dist.barrier()
    if events is not None:
        events.armed = True
    owned, done = [], []
    error = None
    try:
        for i in range(a.get("n", 1000)):
            out = d / f"{a['tag']}-{i:03d}"
            export_to_hf(model, out, arch="qwen3_moe", dtype="bfloat16", max_shard_size=a.get("max_shard_size", "40KB"))
            done.append(i)
            if rank == 0:
                owned.append(str(out))
                P.update_latest(d, out)
                P.apply_retention(owned, 2)
    except BaseException as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    return {"done": done, "error": error, "events": events.count if events is not None else None}


def scenario_hold_staging(rank: int, cmd: dict, events) -> dict:
    """Export, but stop after the first tensor until ``work/go`` exists (an export in flight
    for as long as the test wants); ``work/in_flight`` appears once its staging exists."""
    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

    d = Path(cmd["dir"])
    work = Path(cmd["work"])
    orig = W.ShardWriter.add
    state = {"n": 0}

    def add(self, name, t):
        orig(self, name, t)
        state["n"] += 1
        if state["n"] == 1:
            (work / "in_flight").write_text(str(self.directory))
            t0 = time.time()
            while not (work / "go").exists():
                if time.time() - t0 > 60:
                    raise TimeoutError("the test never said go")
                time.sleep(0.02)

    W.ShardWriter.add = add
    res = export_to_hf(build_gpt(TinySpec()), d / cmd["args"]["name"], arch="qwen3_moe", dtype="bfloat16")
    return {"path": str(res.path)}


SCENARIOS = {"train": scenario_train, "export_loop": scenario_export_loop, "hold_staging": scenario_hold_staging}


# -- the fork server --------------------------------------------------------------------------
def child(cmd: dict, rank: int) -> int:
    work = Path(cmd["work"])
    log = os.open(work / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdin.close()
    os.setpgid(0, 0)
    if cmd.get("fsize"):
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], cmd["fsize"]))
    if cmd.get("uid") is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(cmd["uid"])
        os.setuid(cmd["uid"])
        os.environ["HOME"] = str(work)
    torch.set_num_threads(1)
    ek = cmd.get("event_kill")
    events = None
    if ek is not None and ek.get("rank", 0) == rank:
        events = EventKill(int(ek["at"])).install()
    elif cmd.get("count_events"):
        events = EventCount().install()
    world = cmd.get("ranks", 1)
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{work / 'store'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cmd.get("dist_timeout_s", 20)))
    from nemo_export_hooks.testing.cpu import init_single_process

    init_single_process(ep=cmd.get("ep", 1))
    result = SCENARIOS[cmd["scenario"]](rank, cmd, events)
    with builtins.open(work / f"rank{rank}.json", "w") as f:
        json.dump(result, f)
    if cmd.get("preload_listing"):
        with builtins.open(cmd["preload_listing"], "w") as f:
            json.dump(sorted(sys.modules), f)
    return 0


def serve(cmd: dict) -> dict:
    work = Path(cmd["work"])
    work.mkdir(parents=True, exist_ok=True)
    if cmd.get("uid") is not None:
        os.chmod(work, 0o777)
    ranks = int(cmd.get("ranks", 1))
    t0 = time.time()
    pids = []
    for r in range(ranks):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(cmd, r)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 3
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                except Exception:
                    pass
                os._exit(code)
        pids.append(pid)
    status: dict = {}
    kill = cmd.get("kill")
    killed_at = None
    first_death = None
    deadline = t0 + float(cmd.get("timeout_s", 120))
    grace = float(cmd.get("grace_s", 3))
    started = Path(cmd["work"]) / "started.json"
    t_started = None
    while len(status) < ranks:
        for r, pid in enumerate(pids):
            if r in status:
                continue
            got, st = os.waitpid(pid, os.WNOHANG)
            if got:
                status[r] = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
                if first_death is None and status[r] != 0:
                    first_death = time.time()
        now = time.time()
        if kill is not None and killed_at is None:
            if t_started is None and started.exists():
                t_started = now
            if t_started is not None and now - t_started >= float(kill.get("after_started_s", 0)):
                r = int(kill.get("rank", 0))
                if r not in status:
                    os.kill(pids[r], signal.SIGKILL)
                killed_at = now
        if (first_death is not None and now - first_death > grace) or now > deadline:
            for r, pid in enumerate(pids):  # the launcher tears the job down
                if r not in status:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        time.sleep(0.005)
    return {"exit": [status[r] for r in range(ranks)], "seconds": time.time() - t0, "timed_out": time.time() > deadline}


def preload(work: Path) -> int:
    """Run one short training + export in a child and import here every module it imported:
    children then import nothing lazily, which matters once one drops to an unprivileged user
    who cannot read this interpreter's library (e.g. a Python installed under /root)."""
    import importlib
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="zygote-preload-"))
    listing = tmp / "modules.json"
    cmd = {"scenario": "train", "dir": str(tmp / "out"), "work": str(tmp / "work"), "preload_listing": str(listing),
           "args": {"max_steps": 2, "callback": {"dirpath": str(tmp / "out"), "on_checkpoint_save": False, "every_n_train_steps": 1,
                                                 "async_write": True, "on_busy": "wait", "keep_last_k": 1}}}
    serve(cmd)
    n = 0
    if listing.exists():
        for name in json.loads(listing.read_text()):
            if name in sys.modules or name.startswith("__"):
                continue
            try:
                importlib.import_module(name)
                n += 1
            except BaseException:  # noqa: BLE001 - optional modules that failed there too
                pass
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return n


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    n = preload(Path("."))
    print(json.dumps({"ready": True, "pid": os.getpid(), "preloaded": n}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            reply = serve(json.loads(line))
        except Exception as e:  # noqa: BLE001 - a bad command must not kill the server
            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
