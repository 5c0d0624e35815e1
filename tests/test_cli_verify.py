"""`nemo-export-hooks verify DIR`: exit 0 with a summary on a good export, 1 with problems."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nemo_export_hooks import publish as P
from nemo_export_hooks.cli import main
from nemo_export_hooks.exporter.hf_config import expected_hf_shapes
from nemo_export_hooks.exporter.writer import ShardWriter, finalize_shards


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "tie_word_embeddings": True,
}


@pytest.fixture
def export_dir(tmp_path):
    final = tmp_path / "hf-step10"
    staging = P.make_staging_dir(final)
    shapes = sorted(expected_hf_shapes(TINY_LLAMA).items())
    w = ShardWriter(staging, 64, prefix="rank00000", layout=[(name, torch.float32, tuple(shape)) for name, shape in shapes])
    # every tensor a one-layer llama of this config has (verify builds it on the meta device)
    for i, (name, shape) in enumerate(shapes):
        w.add(name, torch.full(shape, float(i)))
    finalize_shards(staging, w.close(), total_size=w.total_bytes)
    (staging / "config.json").write_text(json.dumps(TINY_LLAMA))
    P.write_manifest(staging, {"step": 10})
    return P.publish(staging, final)


def test_verify_ok(export_dir, capsys):
    assert main(["verify", str(export_dir)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((export_dir / P.MANIFEST_NAME).read_text())
    nbytes = sum(f["bytes"] for f in manifest["files"].values())
    assert out.startswith("OK:") and f"{len(manifest['files'])} files, {nbytes} bytes" in out
    # what verify passes loads, every weight from the shards
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(export_dir), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


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


# -- verify checks names and shapes against config.json (issue 15, item 1) -----------------
def _rewrite_config(path, **changes):
    """Change config.json and re-sign the manifest, as an export written with these values
    would be (the manifest alone would not catch it)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    meta = {k: v for k, v in P.read_manifest(path).items() if k not in ("files", "producer", "created_utc", "manifest_version", "manifest_sha256")}
    P.write_manifest(path, meta)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 7}, r"tensor shape\(s\) do not match LlamaForCausalLM built from config.json: model.embed_tokens.weight is \[8, 4\], config.json gives \[7, 4\]"),
        ({"num_key_value_heads": 2}, r"k_proj.weight is \[2, 4\], config.json gives \[4, 4\]"),
        ({"tie_word_embeddings": False}, r"1 tensor\(s\) LlamaForCausalLM needs are in no shard \(transformers would leave them random\): \['lm_head.weight'\]"),
        ({"architectures": ["FooForCausalLM"]}, r"config.json does not build a transformers model: .*no model class 'FooForCausalLM'"),
        ({"rms_norm_eps": "abc"}, r"config.json rms_norm_eps='abc': must be a finite number, got str"),
        ({"num_hidden_layers": 2}, r"config.json says num_hidden_layers=2, the shards hold 1 layer\(s\) \(layer indices 0..0\): transformers would leave the other layers random"),
    ],
)
def test_verify_refuses_config_that_does_not_fit_the_shards(export_dir, capsys, changes, message):
    _rewrite_config(export_dir, **changes)
    assert main(["verify", str(export_dir)]) == 1
    assert re.search(message, capsys.readouterr().out)


def test_verify_refuses_other_model_type(export_dir, capsys):
    """An export relabelled as another model type: transformers would load it with weights missing."""
    _rewrite_config(export_dir, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    assert main(["verify", str(export_dir)]) == 1
    assert re.search(r"Qwen3ForCausalLM needs are in no shard .*q_norm", capsys.readouterr().out)


def test_verify_refuses_topk_above_experts():
    from nemo_export_hooks.exporter.hf_config import config_problems

    assert config_problems({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 9}) == [
        "config.json num_experts_per_tok=9 is more than the 8 experts"
    ]


def test_verify_refuses_symlinked_shard(export_dir, tmp_path, capsys):
    """A shard replaced by a symlink to an identical file outside the export (issue 15, item 6)."""
    shard = sorted(export_dir.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    assert main(["verify", str(export_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{shard.name}: is a symlink (to {outside}); an export holds only regular files" in out


def test_verify_through_latest_link(export_dir, capsys):
    """The export directory itself may be reached through a link (``latest``)."""
    P.update_latest(export_dir.parent, export_dir)
    assert main(["verify", str(export_dir.parent / "latest")]) == 0


# -- hostile input: bounded time and memory, a one-line reason, no traceback (issue 24, item 4)
@pytest.fixture
def alarm():
    """A hang (a FIFO read, a huge model class) becomes a test failure, not a stuck suite."""
    import signal

    def boom(*_):
        raise TimeoutError("verify did not finish in 60 s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _deep_json_in(d, name):
    (d / name).write_text("[" * 200000 + "]" * 200000)


def _dir_chain(d, name):
    """1,500 nested ``d/``, built inside out with short paths (os.makedirs recurses, and
    1,500 mkdirs of ever longer paths take seconds)."""
    leaf = d.parent / "chain-0"
    leaf.mkdir()
    for i in range(1, 1500):
        up = d.parent / f"chain-{i}"
        up.mkdir()
        leaf.rename(up / "d")
        leaf = up
    leaf.rename(d / "d")


def _remove_chain(top):
    """Remove a deep chain from the top, moving the rest up (pytest's cleanup recurses)."""
    i = 0
    while top.exists():
        child, i = top / "d", i + 1
        nxt = top.parent / f"rm-{i}"
        if child.exists():
            child.rename(nxt)
        top.rmdir()
        top = nxt


def _fifo(d, name):
    import os

    os.mkfifo(d / name)


def _huge_config(d, name):
    with open(d / name, "wb") as f:  # sparse: costs no disk
        f.truncate(512 << 20)


HOSTILE = {
    "deep_config": (_deep_json_in, "config.json", r"config.json is not valid JSON: nested deeper than 64 levels"),
    "deep_manifest": (_deep_json_in, P.MANIFEST_NAME, r"export_manifest.json is not valid JSON: nested deeper than 64 levels"),
    "deep_index": (_deep_json_in, P.INDEX_NAME, r"model.safetensors.index.json is not a valid index: .*nested deeper than 64 levels"),
    "deep_generation_config": (_deep_json_in, "generation_config.json", r"generation_config.json is not valid JSON: nested deeper than 64 levels"),
    "dir_chain_1500": (_dir_chain, "d", r"is not an export: d/d/d/.*directories nested deeper than 16 levels"),
    "fifo_json": (_fifo, "extra.json", r"extra.json: is not a regular file"),
    "config_512MB": (_huge_config, "config.json", r"config.json is 536870912 bytes, more than the 4194304 bytes verify reads of it"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_verify_hostile_input_gives_a_one_line_reason(export_dir, capsys, alarm, case):
    make, name, message = HOSTILE[case]
    make(export_dir, name)
    try:
        assert main(["verify", str(export_dir)]) == 1
        out = capsys.readouterr().out
        assert out.startswith("FAILED:") and "Traceback" not in out
        assert re.search(message, out), out[:2000]
        assert all(len(line) < 2100 for line in out.splitlines())
    finally:
        if case == "dir_chain_1500":
            _remove_chain(export_dir / "d")


@pytest.mark.parametrize(
    "changes, message",
    [
        # claimed sizes are checked against the shard headers before a class is built from them
        ({"num_hidden_layers": 100000}, r"config.json says num_hidden_layers=100000, the shards hold 1 layer\(s\)"),
        ({"rope_theta": 10**400}, r"rope_theta=1000000.*\(401 characters\)"),
    ],
    ids=["layers_100000", "rope_theta_1e400"],
)
def test_verify_hostile_config_values(export_dir, capsys, alarm, changes, message):
    _rewrite_config(export_dir, **changes)
    assert main(["verify", str(export_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED:") and "Traceback" not in out
    assert re.search(message, out), out[:2000]


def test_verify_export_api_checks_config_by_default(export_dir, capsys):
    """``verify_export(path)`` from Python does what the CLI does: a config.json that
    contradicts the tensors (re-signed in the manifest) fails both; only the explicit
    ``load_config=False`` (the CLI's --no-load-config) skips the check."""
    assert P.verify_export(export_dir) == []
    _rewrite_config(export_dir, num_key_value_heads=2)
    problems = P.verify_export(export_dir)
    assert any(re.search(r"k_proj.weight is \[2, 4\], config.json gives \[4, 4\]", p) for p in problems), problems
    assert main(["verify", str(export_dir)]) == 1
    assert P.verify_export(export_dir, load_config=False) == []
