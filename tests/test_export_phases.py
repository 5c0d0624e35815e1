"""The per-phase profile of an export (issue 25): ``ExportResult.phases`` names every phase,
the calling thread's phases add up to at most the export's seconds, and the writer threads'
busy seconds fit inside the write they are part of.  Accounting checks, not speed checks:
nothing here depends on how fast the machine is."""

from __future__ import annotations

import time

import pytest
import torch

from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.api import prepare_export, write_prepared
from nemo_export_hooks.exporter.writer import WRITER_PHASES, ShardWriter
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt

CALLER_SYNC = ("plan_s", "convert_s", "copy_s", "write_s", "commit_s")
CALLER_ASYNC = ("reserve_s", "convert_s", "copy_s", "write_s", "commit_s")
SLACK = 1e-3  # the phases are rounded to 0.1 ms each


def _check(res, caller):
    assert set(res.phases) == {*caller, *WRITER_PHASES}, res.phases
    assert all(isinstance(v, float) and v >= 0 for v in res.phases.values()), res.phases
    assert sum(res.phases[k] for k in caller) <= res.seconds + SLACK, (res.phases, res.seconds)
    # the writer threads live inside the write stage: their mean busy time fits in it
    stage = res.phases["write_s"] + (0 if "reserve_s" in caller else res.phases["convert_s"] + res.phases["copy_s"])
    assert sum(res.phases[k] for k in WRITER_PHASES) <= stage + SLACK, res.phases


@pytest.mark.parametrize("writers", [1, 2])
def test_sync_export_reports_every_phase(mcore, tmp_path, writers):
    model = build_gpt(TinySpec())
    res = export_to_hf(model, tmp_path / "hf", arch="qwen3_moe", writers=writers)
    _check(res, CALLER_SYNC)


def test_async_export_reports_the_snapshot_phases(mcore, tmp_path):
    model = build_gpt(TinySpec())
    t0 = time.perf_counter()  # as the callback does: the snapshot is part of the export's time
    prepared = prepare_export(model, "qwen3_moe", torch.bfloat16, check_hf_keys=False)
    snap = prepared.host_snapshot()
    assert set(snap.phases) == {"reserve_s", "convert_s", "copy_s"}
    res = write_prepared(prepared, snap, tmp_path / "hf", t0=t0)
    _check(res, CALLER_ASYNC)


def test_writer_threads_sum_their_own_phases(tmp_path):
    """With 4 writer threads the timings are the mean thread's busy seconds per phase, within
    the writer's lifetime (a sum over threads would exceed it)."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"model.layers.{i}.w": torch.randn(64, 33, generator=g).to(torch.bfloat16) for i in range(40)}
    t0 = time.perf_counter()
    w = ShardWriter(tmp_path, 10**6, prefix="p", layout=[(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                    writers=4, min_part_bytes=4096)
    for k, t in tensors.items():
        w.add(k, t)
    w.close()
    lifetime = time.perf_counter() - t0
    assert len(w.files) == 4
    assert set(w.timings) == set(WRITER_PHASES) and all(v >= 0 for v in w.timings.values())
    assert sum(w.timings.values()) <= lifetime


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_reserved_pageable_pool_is_resident_at_once():
    """A pool reserved at setup (``reserve_host``) on a CPU model has its pages faulted in then
    (a pinned one is by page-locking), not by the first export's copy in the training thread's
    wait; ``seconds`` says where the reservation's time went."""
    from nemo_export_hooks.exporter import snapshot

    n = 128 << 20
    before = _rss_anon()
    pool = snapshot._Pool(n, pin=False)
    added = _rss_anon() - before
    assert added >= 0.9 * n, f"only {added / 2**20:.0f} MiB of the {n / 2**20:.0f} MiB pool is resident"
    assert set(pool.seconds) == {"alloc_s", "pin_s", "touch_s"} and all(v >= 0 for v in pool.seconds.values())
    pool.free()
