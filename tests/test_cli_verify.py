"""`nemo-export-hooks verify DIR`: exit 0 with a summary on a good export, 1 with problems."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_export_hooks import publish as P
from nemo_export_hooks.cli import main
from nemo_export_hooks.exporter.writer import ShardWriter, finalize_shards


@pytest.fixture
def export_dir(tmp_path):
    final = tmp_path / "hf-step10"
    staging = P.make_staging_dir(final)
    w = ShardWriter(staging, 64, prefix="rank00000", layout=[(f"w{i}", torch.float32, (4, 3)) for i in range(4)])
    for i in range(4):
        w.add(f"w{i}", torch.full((4, 3), float(i)))
    finalize_shards(staging, w.close(), total_size=w.total_bytes)
    (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
    P.write_manifest(staging, {"step": 10})
    return P.publish(staging, final)


def test_verify_ok(export_dir, capsys):
    assert main(["verify", str(export_dir)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((export_dir / P.MANIFEST_NAME).read_text())
    nbytes = sum(f["bytes"] for f in manifest["files"].values())
    assert out.startswith("OK:") and f"{len(manifest['files'])} files, {nbytes} bytes" in out


def test_verify_corrupt_byte_exits_1(export_dir, capsys):
    shard = sorted(export_dir.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(export_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED:") and shard.name in out and "sha256" in out


def test_verify_missing_dir_exits_1(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "verify" in capsys.readouterr().err


def test_verify_requires_dir():
    with pytest.raises(SystemExit) as ei:
        main(["verify"])
    assert ei.value.code == 2
