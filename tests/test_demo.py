"""The embedded default: ``python -m nemo_export_hooks.demo --out DIR`` on CPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_export_hooks import demo
from nemo_export_hooks import publish as P

ROOT = Path(__file__).resolve().parents[1]


def _env():
    # the pytest process may hold a gloo rendezvous (MASTER_PORT...); a child needs its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_demo_entry_point_end_to_end(tmp_path):
    out = tmp_path / "demo_run"
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "nemo_export_hooks.demo", "--out", str(out), "--threads", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RESULT: OK" in r.stdout and "max |logit diff|" in r.stdout
    assert "exports: 4 made" in r.stdout
    # one log line per export on rank 0: step, path, GB, seconds, GB/s
    assert r.stderr.count("hf_export: step ") == 4
    ck = out / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert names == [
        "epoch=0-step=15-hf", "epoch=0-step=15.ckpt", "epoch=0-step=30-hf", "epoch=0-step=30.ckpt",
        "latest", "latest.txt", "step=10-hf", "step=20-hf",
    ]
    assert os.readlink(ck / "latest") == "epoch=0-step=30-hf"
    for n in names:
        if n.endswith("-hf"):
            assert P.verify_export(ck / n) == []
    assert not [p for p in out.rglob(".*") if p.is_dir()]
    assert elapsed < 300
    # a second run into the same directory replaces the earlier demo run
    r2 = subprocess.run(
        [sys.executable, "-m", "nemo_export_hooks.demo", "--out", str(out), "--steps", "4", "--every", "2",
         "--ckpt-every", "0", "--sync", "--quiet"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "latest.txt", "step=2", "step=4"]


@pytest.fixture
def restore_logging():
    names = ["", "nemo_export_hooks", "lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "megatron"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)
    logging.getLogger().handlers[:] = handlers


def test_demo_exits_nonzero_when_logits_differ(mcore, tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setattr(demo, "max_logit_diff", lambda *a, **k: (0.5, "Qwen3MoeForCausalLM"))
    rc = demo.main(["--out", str(tmp_path / "d"), "--steps", "2", "--every", "1", "--ckpt-every", "0", "--quiet", "--threads", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "RESULT: FAILED" in out and "max |logit diff| 0.5 > 0.0001" in out


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an earlier demo run"):
        demo.main(["--out", str(tmp_path)])
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_help_is_fast():
    r = subprocess.run([sys.executable, "-m", "nemo_export_hooks.demo", "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--out" in r.stdout
