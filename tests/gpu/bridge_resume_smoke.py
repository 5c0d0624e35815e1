"""Megatron-Bridge kill-and-resume on one GPU with ``HFExportBridgeCallback`` (issue 24, item 1; device
only, not collected by pytest; PREPARED, NOT YET RUN).

``tests/test_megatron_bridge.py::test_kill_and_resume_from_an_older_iteration_leaves_no_discarded_weights``
proves this on the CPU stand-in of Bridge's loop (``nemo_export_hooks.testing.bridge_loop``); this
script runs the same story through Bridge's own ``pretrain`` (the tiny TEGroupedMLP Qwen3-MoE of
``bridge_smoke.py``), once per retention case:

1. ``first``: train to 6, a ``torch_dist`` checkpoint every 2, our callback (sync writes), then
   SIGKILL the process right after the checkpoint and export of iteration 6 (a crashed job):
   ``iter_4/hf`` and ``iter_6/hf`` hold a future that the resume discards.
2. ``resume``: ``checkpoint.load=<save>``, ``ckpt_step=2``, another data order (dataset seed + 7),
   train to 6 again: Bridge saves 4 and 6 anew, our callback exports them (async writes).

Checks per case (``keep_last_2``: ``keep_last_k=2``; ``keep_all``: no retention):
* the exports present are the expected ones (keep_last_2: 4, 6; keep_all: 2, 4, 6);
* each verifies (``verify_export``) and is byte-equal to ``export_to_hf`` of its checkpoint
  reloaded by Bridge (``load_megatron_model``);
* the exports of 4 and 6 changed since the first run (so the byte check can fail);
* the run keeps its identity: the resumed run's ``run_id`` (manifests of 4 and 6) equals the
  first run's, read back from ``iter_0000002/hf_export_state.json``.

Run (device, after the Bridge staging): ``OUT=$OUT PYTHONPATH=/root/site19:/root/site:$PWD python3
tests/gpu/bridge_resume_smoke.py``.  Last line ``BRIDGE-RESUME {json}``; exit 0 only if every check
passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bridge_smoke as B  # noqa: E402  (sets the environment the device needs)

CASES = {"keep_last_2": dict(keep_last_k=2), "keep_all": {}}
KILL_AT, RESUME_FROM, ITERS = 6, 2, 6


def _digests(path: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def run_worker(stage: str, case: str, work: Path) -> dict:
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback

    save = work / case / "ckpt"
    cfg = B.make_config(save, async_save=False)
    cfg.train.train_iters = ITERS
    cfg.scheduler.lr_decay_iters = ITERS
    if stage == "resume":
        cfg.checkpoint.load = str(save)
        cfg.checkpoint.ckpt_step = RESUME_FROM
        cfg.dataset.random_seed = B.SEED + 7  # another data order: the redone iterations differ
    cb = HFExportBridgeCallback(arch="qwen3_moe", dtype="float32", async_write=stage == "resume",
                                tokenizer=str(work / "tokenizer"), **CASES[case])
    result_path = work / f"{case}_{stage}.json"

    def result(**extra) -> dict:
        return {"stage": stage, "case": case, "exports": list(cb.exports), "failed": cb.failed, "skipped": cb.skipped,
                "run_id": cb.scheduler.run_id, "save_dir": str(save),
                "hf": {p.parent.name: _digests(p) for p in sorted(save.glob("iter_*/hf")) if p.is_dir()}, **extra}

    class Killer(Callback):  # after ours (callbacks run in order): the export of KILL_AT is complete
        def on_checkpoint_save(self, context):
            if stage == "first" and int(context.state.train_state.step) == KILL_AT:
                B.write_json(result_path, result(killed_at=KILL_AT))
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.perf_counter()
    pretrain(cfg, forward_step, callbacks=[cb, Killer()])
    return result(train_wall_s=round(time.perf_counter() - t0, 2))


def check_worker(work: Path) -> dict:
    import torch

    from nemo_export_hooks.integrations.megatron_bridge import read_run_state
    from nemo_export_hooks.publish import read_manifest, verify_export

    B._init_dist()
    rows = []
    for case in CASES:
        p: list[str] = []
        row = {"case": case, "problems": p}
        try:
            first = json.loads((work / f"{case}_first.json").read_text())
            resumed = json.loads((work / f"{case}_resume.json").read_text())
            save = Path(resumed["save_dir"])
            want = [4, 6] if case == "keep_last_2" else [2, 4, 6]
            present = [n for n in (2, 4, 6) if (save / f"iter_{n:07d}" / "hf").is_dir()]
            row["present"] = present
            if present != want:
                p.append(f"exports present for iterations {present}, expected {want}")
            if first.get("killed_at") != KILL_AT:
                p.append(f"the first run was not killed at {KILL_AT}: {first.get('killed_at')}")
            for key in ("failed", "skipped"):
                if resumed.get(key):
                    p.append(f"resumed run: {key}={resumed[key]}")
            state = read_run_state(save / f"iter_{RESUME_FROM:07d}") or {}
            row["first_run_id"], row["resumed_run_id"] = first.get("run_id"), resumed.get("run_id")
            if not first.get("run_id") or resumed.get("run_id") != first.get("run_id"):
                p.append(f"run identity lost: first {first.get('run_id')}, resumed {resumed.get('run_id')}")
            if state.get("run_id") != first.get("run_id"):
                p.append(f"iter_{RESUME_FROM:07d}/hf_export_state.json holds run_id {state.get('run_id')}")
            for n in present:
                export = save / f"iter_{n:07d}" / "hf"
                p += [f"iter {n}: verify_export: {v}" for v in verify_export(export)]
                if n in (4, 6):
                    if read_manifest(export).get("run_id") != first.get("run_id"):
                        p.append(f"iter {n}: manifest run_id {read_manifest(export).get('run_id')} is not the run's")
                    before = first["hf"].get(f"iter_{n:07d}")
                    if before is not None and before == _digests(export):
                        p.append(f"iter {n}: export equals the discarded run's: the byte check proves nothing")
                model, how, _, diff = B.against_checkpoint(export, save / f"iter_{n:07d}", work, f"{case}_{n}")
                row[f"iter_{n}_byte_equal"] = not diff
                p += [f"iter {n}: bytes vs checkpoint reloaded ({how[:40]}): {d}" for d in diff[:6]]
                del model
                torch.cuda.empty_cache()
        except Exception as ex:  # noqa: BLE001 - one case's failure is reported, the other still runs
            p.append(f"{type(ex).__name__}: {ex}")
            row["traceback"] = traceback.format_exc()[-2000:]
        row["ok"] = not p
        rows.append(row)
    return {"name": "check", "rows": rows}


def driver(args) -> int:
    out, work, deadline = B.prepare_run(args, "/tmp/bridge_resume_out")
    steps = [(f"{case}_{stage}", ["--case", case, "--stage", stage]) for case in CASES for stage in ("first", "resume")]
    steps.append(("check", ["--stage", "check"]))
    res, problems = {}, []
    for name, extra in steps:
        left = deadline - time.perf_counter()
        if left < 30:
            problems.append(f"{name}: not run ({args.budget} s budget spent)")
            continue
        r = B._spawn(name, work, out, min(left, args.run_timeout), extra, argv=[__file__, "--worker", "--work", str(work)],
                     tf32_off=True, log_prefix="bridge_resume")
        res[name] = r
        print(f"bridge_resume: {name}: rc={r['rc']} in {r['process_wall_s']} s", flush=True)
        killed = name.endswith("_first") and r["rc"] == -signal.SIGKILL
        if r.get("error") and not (killed and "exports" in r):
            problems.append(f"{name}: {r['error'][:1500]}")
    for row in res.get("check", {}).get("rows", []):
        print(f"{row['case']}: ok={row['ok']} present={row.get('present')} run_id first={row.get('first_run_id')} "
              f"resumed={row.get('resumed_run_id')} " + " ".join(f"{k}={v}" for k, v in row.items() if k.endswith("byte_equal")))
        problems += [f"{row['case']}: {q}" for q in row["problems"]]
    res["problems"], res["ok"] = problems, not problems
    B.write_json(out / "bridge_resume.json", res)
    print("\n".join(["", "PROBLEMS:"] + problems) if problems else "\nALL CHECKS PASSED")
    print("BRIDGE-RESUME " + json.dumps({"ok": res["ok"], "problems": problems[:6]}, default=str), flush=True)
    return 0 if res["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--stage", choices=["first", "resume", "check"])
    ap.add_argument("--work", default="/tmp/bridge_resume")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BRIDGE_RESUME_BUDGET", 420)))
    ap.add_argument("--run-timeout", type=float, default=150)
    args = ap.parse_args()
    if not args.worker:
        return driver(args)
    work = Path(args.work)
    name = "check" if args.stage == "check" else f"{args.case}_{args.stage}"
    try:
        res = check_worker(work) if args.stage == "check" else run_worker(args.stage, args.case, work)
    except BaseException as e:  # noqa: BLE001 - the driver reads the reason from the result file
        res = {"name": name, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    B.write_json(work / f"{name}.json", res)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
