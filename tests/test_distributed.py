"""Per-rank distributed export under torchrun (gloo on CPU, world sizes 2 and 4).

The world-size-1 references (Megatron weights, their export, Megatron logits) are built
here, in-process; then one torchrun launch per world size (tests/dist/run_layouts.py)
exports the same weights under each parallel layout and rank 0 checks, per layout:

* the export has the same keys and the same tensors, bit for bit, and the same config.json
  as the world-size-1 export;
* it loads in transformers and its logits match the parallel Megatron forward gathered on
  rank 0 (TP/EP collectives, PP stages by send/recv) and the world-size-1 forward (<= 1e-4);
* no rank's exporter ever held more than its own shard plus one max-shard buffer (counted
  allocation by allocation), a bound a full-model gather provably breaks;
* error propagation (world size 2): one rank fails while planning, writing or converting,
  rank 0 alone fails the HF key check, the parent directory is unusable, or TP peers hold
  different models -> every rank raises, nothing is published, and a later export on the
  same process groups succeeds.

Every launch runs under a timeout in its own process group, so a hung collective fails
the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "dist"
sys.path.insert(0, str(DIST))
import dist_common as C  # noqa: E402

from nemo_export_hooks.testing.layouts import LEGACY_GROUPED_REMOVED, have_legacy_grouped  # noqa: E402

pytestmark = pytest.mark.dist

TORCHRUN = Path(sys.executable).with_name("torchrun")
WS2 = ["tp2", "ep2", "ep2_te_grouped", "pp2", "pp2_vpp2", "tp2_dense_tied", "pp2_dense_tied"]
WS4 = ["tp2_ep2", "ep4", "tp2_ep2_etp1", "ep2_etp2", "tp2_ep2_te_grouped", "tp2_ep2_legacy_grouped", "ep2_pp2_legacy_grouped", "tp2_pp2_llama"]
# megatron-core >= 0.17 has no legacy GroupedMLP: those layouts are skipped and not launched
HAVE_LEGACY = have_legacy_grouped()
WS4_RUN = [n for n in WS4 if HAVE_LEGACY or "legacy_grouped" not in n]
FAILURE_CASES = ["writer_fails_on_rank1", "plan_fails_on_rank1", "convert_fails_on_owner", "unwritable_parent", "tp_peers_differ", "key_check_fails_on_rank0", "export_after_failures"]
LAUNCH_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 60  # gloo timeout inside the programs: a hung collective errors out


def torchrun(nproc: int, args: list[str], log: Path, timeout: int = LAUNCH_TIMEOUT_S, program: str = "run_layouts.py") -> tuple[int, str]:
    """Run ``torchrun`` in its own session; on timeout kill that whole process group."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        NEH_DIST_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", str(DIST / program), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    text = log.read_text(errors="replace")
    return rc, text


@pytest.fixture(scope="module")
def reference(mcore, tmp_path_factory):
    from nemo_export_hooks.testing.cpu import init_single_process

    init_single_process()  # world size 1, whatever an earlier test left behind
    root = tmp_path_factory.mktemp("ref")
    for key in C.SPECS:
        C.make_reference(key, root)
    return root


def _launch(nproc, layouts, reference, tmp_path_factory, failures=False):
    out = tmp_path_factory.mktemp(f"ws{nproc}")
    args = ["--ref", str(reference), "--out", str(out), "--layouts", ",".join(layouts)]
    if failures:
        args.append("--failures")
    rc, log = torchrun(nproc, args, out / "torchrun.log")
    return {"rc": rc, "log": log, "out": out}


@pytest.fixture(scope="module")
def ws2(reference, tmp_path_factory):
    return _launch(2, WS2, reference, tmp_path_factory, failures=True)


@pytest.fixture(scope="module")
def ws4(reference, tmp_path_factory):
    return _launch(4, WS4_RUN, reference, tmp_path_factory)


def _result(run, name) -> dict:
    path = run["out"] / "results" / f"{name}.json"
    if not path.exists():
        crashed = sorted(p.name for p in (run["out"] / "results").glob(f"{name}.rank*.json")) if (run["out"] / "results").exists() else []
        detail = [json.loads((run["out"] / "results" / c).read_text())["problems"] for c in crashed]
        pytest.fail(f"no result for {name} (torchrun rc={run['rc']}, crashed: {detail}); log tail:\n{run['log'][-6000:]}")
    return json.loads(path.read_text())


def _check_layout(run, name):
    res = _result(run, name)
    assert not res["problems"], res["problems"]
    checks = res["checks"]
    assert checks["tensors_bitwise_vs_ws1_export"]
    assert checks["hf_vs_ws1_megatron_max_abs"] <= C.ATOL
    # every layout here runs its parallel forward on CPU: logits compared with it
    assert checks["parallel_forward"] == "ran", checks["parallel_forward"]
    assert checks["hf_vs_parallel_megatron_max_abs"] <= C.ATOL
    assert checks["parallel_vs_ws1_megatron_max_abs"] <= C.ATOL
    layout = C.LAYOUTS[name]
    assert res["world_size"] == layout.world
    for r in res["per_rank"]:  # the memory bound (also among "problems"), spelled out
        assert r["peak_bytes"] <= r["local_bytes"] + res["max_shard_bytes"], r
        assert res["full_model_bytes"] > r["local_bytes"] + res["max_shard_bytes"]
    return res


@pytest.mark.parametrize("name", WS2)
def test_world_size_2(ws2, name):
    res = _check_layout(ws2, name)
    if name == "tp2":
        # only the TP owner writes; its peer only sends
        writers = [r["rank"] for r in res["per_rank"] if r["written_bytes"]]
        assert writers == [0]
        # negative control: a rank that gathered the model would break the memory bound
        for n, r in zip(res["naive"], res["per_rank"]):
            assert n["naive_peak_bytes"] > r["local_bytes"] + res["max_shard_bytes"]
    if name in ("ep2", "ep2_te_grouped"):
        assert all(r["written_bytes"] for r in res["per_rank"]), "each EP rank writes its own experts"
    if name == "pp2_vpp2":
        # Megatron's layer_number is global under virtual pipeline: chunk v of stage p
        assert [r["layers"] for r in res["per_rank"]] == [[[0], [2]], [[1], [3]]]
    if name == "pp2":
        assert [r["layers"] for r in res["per_rank"]] == [[[0, 1]], [[2, 3]]]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.skipif(n not in WS4_RUN, reason=LEGACY_GROUPED_REMOVED)) for n in WS4]
)
def test_world_size_4(ws4, name):
    res = _check_layout(ws4, name)
    if name == "ep4":
        assert all(r["written_bytes"] for r in res["per_rank"]), "each EP rank writes its own experts"


@pytest.mark.parametrize("case", FAILURE_CASES)
def test_one_rank_fails_every_rank_raises(ws2, case):
    res = _result(ws2, "failures")
    assert case in res, sorted(res)
    assert not res[case]["problems"], res[case]


def test_shard_names_stable_across_runs(ws2):
    """The same layout exported twice (before and after the failure cases) maps every key
    to the same shard file."""
    a = json.loads((ws2["out"] / "tp2" / "model.safetensors.index.json").read_text())["weight_map"]
    b = json.loads((ws2["out"] / "failures" / "after" / "tp2" / "model.safetensors.index.json").read_text())["weight_map"]
    assert a == b


def test_collectives_gloo(tmp_path):
    """parallel.py's gathers (dims 0/1, 3-D, gated, bf16/fp16, non-contiguous shards) and
    error agreement on their own; the same program runs on NCCL on a 2-GPU machine."""
    rc, log = torchrun(2, ["--backend", "gloo"], tmp_path / "collectives.log", timeout=120, program="collectives.py")
    line = [l for l in log.splitlines() if l.startswith("{")]
    assert rc == 0 and line, log[-4000:]
    res = json.loads(line[-1])
    assert res["ok"], res["problems"]


def test_launches_exit_cleanly(ws2, ws4):
    for run in (ws2, ws4):
        assert run["rc"] == 0, run["log"][-6000:]


def test_on_coordinator_one_rank(tmp_path):
    """The coordinator step alone: its value, or a RuntimeError that names what failed and
    chains the cause; ranks' own reports (RanksFailed) are not prefixed with a type name."""
    from nemo_export_hooks.exporter import parallel

    assert parallel.on_coordinator(lambda: ("ok", 3), "unused") == ("ok", 3)

    def broken():
        raise FileExistsError(f"{tmp_path} holds something else")

    with pytest.raises(RuntimeError, match=r"^cannot export to x: FileExistsError: .* holds something else$") as ei:
        parallel.on_coordinator(broken, "cannot export to x")
    assert isinstance(ei.value.__cause__, FileExistsError)

    def refuse():
        raise parallel.RanksFailed("rank 1: OSError: disk full; rank 3: OSError: disk full")

    with pytest.raises(RuntimeError, match=r"^HF export to y failed: rank 1: OSError: disk full; rank 3: OSError: disk full$"):
        parallel.on_coordinator(refuse, "HF export to y failed")
