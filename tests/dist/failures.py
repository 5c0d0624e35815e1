"""Error propagation under torchrun: when one rank fails during ``export_to_hf``, every
rank must raise (none may wait forever in a collective), nothing may be published, and the
ranks' collectives must still line up afterwards (a later export succeeds).

Each case injects a failure on some ranks only, catches what every rank raised, and
gathers the outcomes on rank 0.  The pytest launcher runs the whole program under a
timeout, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path

import torch

import dist_common as C


def _model(layout: C.Layout, ref_root: Path):
    C.init_parallel(tp=layout.tp, ep=layout.ep, pp=layout.pp, vpp=layout.vpp, etp=layout.etp)
    chunks = C.build_chunks(layout.model, layout)
    C.load_reference(chunks, ref_root / layout.model / "megatron.safetensors")
    if layout.experts == "te_grouped":
        from nemo_export_hooks.testing.layouts import to_te_grouped

        for c in chunks:
            to_te_grouped(c)
    return chunks


@contextlib.contextmanager
def patched(obj, name, value, when: bool):
    if not when:
        yield
        return
    orig = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, orig)


def _attempt(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
        out = {"raised": False}
    except Exception as e:  # the point: every rank gets here
        out = {"raised": True, "type": type(e).__name__, "message": str(e)[:600]}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_all(ref_root: Path, out_root: Path) -> dict:
    import torch.distributed as dist

    from nemo_export_hooks import export_to_hf
    from nemo_export_hooks.exporter import execute, parallel, writer

    rank = dist.get_rank()
    results: dict = {}
    root = out_root / "failures"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    parallel.barrier()

    def export(chunks, name, arch="qwen3_moe", path=None):
        export_to_hf(chunks, path or (root / name), arch=arch, dtype=torch.float32, max_shard_size="64KB")

    def record(name, outcome, expect_types: dict, expect_in_message: dict, out_dir: Path):
        outcomes = parallel.gather_objects(outcome)
        if rank == 0:
            problems = []
            for r, o in enumerate(outcomes):
                if not o["raised"]:
                    problems.append(f"rank {r} did not raise")
                    continue
                want = expect_types.get(r, expect_types.get("*"))
                if want and o["type"] != want:
                    problems.append(f"rank {r} raised {o['type']}, expected {want}: {o['message']}")
                for needle in expect_in_message.get(r, expect_in_message.get("*", ())):
                    if needle not in o["message"]:
                        problems.append(f"rank {r}: {needle!r} not in {o['message']!r}")
            if out_dir.exists():
                problems.append(f"{out_dir} was published although the export failed")
            leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")] if out_dir.parent.is_dir() else []
            if leftovers:
                problems.append(f"staging left behind: {leftovers}")
            results[name] = {"outcomes": outcomes, "problems": problems}
            print(f"[failure {name}] {'OK' if not problems else 'FAIL'} {[(o.get('type'), o['seconds']) for o in outcomes]}", flush=True)

    ep2 = C.LAYOUTS["ep2"]
    tp2 = C.LAYOUTS["tp2"]

    # 1. rank 1 cannot write its shard files (permissions / a full disk on its node)
    chunks = _model(ep2, ref_root)

    def refuse(self, *args):
        raise PermissionError(f"injected: rank {rank} cannot write into {self.directory}")

    with patched(writer.ShardWriter, "add", refuse, when=rank == 1):
        outcome = _attempt(lambda: export(chunks, "writer_fails_on_rank1"))
    record("writer_fails_on_rank1", outcome, {"*": "RuntimeError"},
           {"*": ["rank 1", "injected"]}, root / "writer_fails_on_rank1")

    # 2. planning fails on rank 1 only (one EP rank's experts are broken) before any collective
    chunks = _model(C.LAYOUTS["ep2_te_grouped"], ref_root)
    if rank == 1:
        del chunks[0].decoder.layers[2].mlp.experts.linear_fc1._parameters["weight1"]
    outcome = _attempt(lambda: export(chunks, "plan_fails_on_rank1"))
    record("plan_fails_on_rank1", outcome, {1: "ExpertLayoutError", "*": "RuntimeError"},
           {1: ["layer 2 expert 3"], "*": ["rank 1", "ExpertLayoutError", "layer 2 expert 3"]}, root / "plan_fails_on_rank1")

    # 3. the owner fails converting one tensor in the middle of the stream while its TP peer
    #    goes on to the next gather
    chunks = _model(tp2, ref_root)
    calls = {"n": 0}
    orig_convert = execute.convert

    def flaky_convert(job, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError(f"injected: cannot convert {job.source}")
        return orig_convert(job, *a, **k)

    with patched(execute, "convert", flaky_convert, when=rank == 0):
        outcome = _attempt(lambda: export(chunks, "convert_fails_on_owner"))
    record("convert_fails_on_owner", outcome, {0: "RuntimeError", 1: "RuntimeError"},
           {"*": ["rank 0", "injected: cannot convert"]}, root / "convert_fails_on_owner")

    # 4. out_dir's parent cannot hold a directory (rank 0 creates the staging directory)
    blocker = root / "a_file"
    if rank == 0:
        blocker.write_text("x")
    parallel.barrier()
    outcome = _attempt(lambda: export(chunks, "unwritable_parent", path=blocker / "hf"))
    record("unwritable_parent", outcome, {"*": "RuntimeError"}, {"*": ["cannot export to"]}, blocker / "hf")

    # 5. TP peers hold different models (rank 1 lost a layer): their gathers would not line
    #    up, which must be detected before the first gather instead of hanging
    chunks = _model(tp2, ref_root)
    if rank == 1:
        del chunks[0].decoder.layers[3]
    outcome = _attempt(lambda: export(chunks, "tp_peers_differ"))
    record("tp_peers_differ", outcome, {"*": "ValueError"}, {"*": ["hold different models"]}, root / "tp_peers_differ")

    # 6. rank 0 alone cannot list the HF key set (it alone builds the HF class): the others
    #    wait for its verdict, so the error must reach them instead of stranding them
    chunks = _model(ep2, ref_root)

    def broken_keys(cfg):
        raise ImportError("injected: this transformers has no such model class")

    from nemo_export_hooks.exporter import hf_names

    with patched(hf_names, "expected_hf_shapes", broken_keys, when=rank == 0):
        outcome = _attempt(lambda: export(chunks, "key_check_fails_on_rank0"))
    record("key_check_fails_on_rank0", outcome, {"*": "ValueError"}, {"*": ["cannot list the HF keys", "injected"]},
           root / "key_check_fails_on_rank0")

    # 7. afterwards the same process groups still work: a normal export succeeds and is right
    try:
        import run_layouts

        res = run_layouts.run_layout(C.LAYOUTS["tp2"], ref_root, root / "after")
        if rank == 0:
            results["export_after_failures"] = {"problems": res["problems"], "checks": res["checks"]}
            print(f"[failure export_after_failures] {'OK' if not res['problems'] else 'FAIL'}", flush=True)
    except Exception as e:
        traceback.print_exc()
        results["export_after_failures"] = {"problems": [f"rank {rank}: {type(e).__name__}: {e}"]}
    return results
