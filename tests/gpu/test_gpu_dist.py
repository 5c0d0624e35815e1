"""Two GPUs (nvidia-h200-x2, NCCL): a TEGroupedMLP Qwen3-MoE exported collectively under expert
parallelism 2 and under tensor parallelism 2 must be bit-exact with the one-GPU export of the
same weights (resharded by Megatron's dist checkpointing) and give the one-GPU Megatron
forward's logits in transformers (float32, max |diff| <= 5e-3); each case runs
tests/gpu/gpu_dist_worker.py under torchrun.  Also the exporter's collectives on NCCL.
Skipped with fewer than two GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core", gpus=2)

import gpu_common as G  # noqa: E402

WORKER = Path(__file__).resolve().parent / "gpu_dist_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list, timeout: int) -> subprocess.CompletedProcess:
    """Two ranks of ``args`` under torchrun, the project importable, NVLink multicast off (as
    the device README asks); prints the tail of both streams for the suite log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    print(r.stdout[-6000:])
    print(r.stderr[-6000:], file=sys.stderr)
    return r


@pytest.mark.parametrize("mode", ["ep2", "tp2"])
def test_two_gpu_export(mode, tmp_path, request):
    r = _torchrun([WORKER, mode, tmp_path, request.node.nodeid], timeout=300)
    assert r.returncode == 0, f"torchrun {mode} exited {r.returncode}: {r.stdout[-800:]} {r.stderr[-1500:]}"


def test_two_gpu_nccl_collectives(request):
    """``exporter/parallel.py``'s collectives on NCCL, without Megatron (tests/dist/collectives.py:
    gather_to_owner for several shapes/dtypes/split dims incl. gated fc1, all_ok/raise naming
    the failing rank, gather_objects/broadcast_object, max_over)."""
    r = _torchrun([ROOT / "tests" / "dist" / "collectives.py", "--backend", "nccl"], timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{") and '"ok"' in ln]
    report = json.loads(lines[-1]) if lines else {}
    G.record(request.node.nodeid, ok=report.get("ok"), problems=report.get("problems", [])[:6], rc=r.returncode,
             checks=report.get("checks"))
    assert r.returncode == 0 and report.get("ok"), f"rc {r.returncode}: {report or r.stderr[-1500:]}"
