"""Bad input fails loudly, names what is wrong, and writes nothing."""

from __future__ import annotations

import pytest
import torch

from nemo_export_hooks import export_to_hf
from nemo_export_hooks.exporter.experts import ExpertLayoutError
from nemo_export_hooks.exporter.rules import ArchMismatchError
from nemo_export_hooks.testing.cpu import TinySpec, build_gpt
from nemo_export_hooks.testing.layouts import to_te_grouped


def _nothing_written(tmp_path):
    assert list(tmp_path.iterdir()) == [] or all(p.name == "keep" for p in tmp_path.iterdir())


def test_unknown_arch_lists_supported(mcore, tmp_path):
    m = build_gpt(TinySpec())
    with pytest.raises(ValueError, match=r"unknown arch 'gpt9'.*llama.*mixtral.*qwen3_moe"):
        export_to_hf(m, tmp_path / "hf", arch="gpt9")
    _nothing_written(tmp_path)


def test_missing_grouped_expert_names_layer_and_expert(mcore, tmp_path):
    m = build_gpt(TinySpec())
    to_te_grouped(m)
    del m.decoder.layers[1].mlp.experts.linear_fc1._parameters["weight2"]
    with pytest.raises(ExpertLayoutError, match=r"layer 1 expert 2 .*linear_fc1.*weight2"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    _nothing_written(tmp_path)


def test_qk_norm_does_not_fit_mixtral(mcore, tmp_path):
    m = build_gpt(TinySpec(qk_layernorm=True))
    with pytest.raises(ArchMismatchError, match="mixtral has no qk-norm"):
        export_to_hf(m, tmp_path / "hf", arch="mixtral")
    _nothing_written(tmp_path)


def test_experts_do_not_fit_llama(mcore, tmp_path):
    m = build_gpt(TinySpec(qk_layernorm=False))
    with pytest.raises(ArchMismatchError, match=r"arch 'llama' has no experts.*MoE layers \[0, 1\]"):
        export_to_hf(m, tmp_path / "hf", arch="llama")


def test_unsupported_activation(mcore, tmp_path):
    spec = TinySpec(num_experts=None, extra={"activation_func": torch.tanh, "gated_linear_unit": True})
    m = build_gpt(spec)
    with pytest.raises(ArchMismatchError, match="unsupported activation function 'tanh'"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3")


def test_wrong_activation_for_arch(mcore, tmp_path):
    m = build_gpt(TinySpec(num_experts=None, activation="gelu"))
    with pytest.raises(ArchMismatchError, match="qwen3 needs SiLU, the model uses gelu"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3")


def test_non_empty_out_dir_refused_unless_overwrite(mcore, tmp_path):
    m = build_gpt(TinySpec())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="exists and is not empty"):
        export_to_hf(m, out, arch="qwen3_moe")
    # overwrite=True still refuses a directory we did not create
    with pytest.raises(RuntimeError, match="not an export made by nemo-export-hooks"):
        export_to_hf(m, out, arch="qwen3_moe", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    out2 = tmp_path / "hf2"
    export_to_hf(m, out2, arch="qwen3_moe")
    export_to_hf(m, out2, arch="qwen3_moe", overwrite=True)  # an earlier export may be replaced
    assert (out2 / "config.json").exists()


def test_overwrite_refuses_a_foreign_manifest_up_front(mcore, tmp_path):
    """A manifest file alone does not make a directory ours (one ownership rule,
    store.manifest.ownership): a foreign producer's export is refused before anything is
    written, not after every shard was (when publish would refuse it)."""
    m = build_gpt(TinySpec())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "export_manifest.json").write_text('{"producer": {"name": "someone-else"}, "files": {}}')
    with pytest.raises(RuntimeError, match="not an export made by nemo-export-hooks"):
        export_to_hf(m, out, arch="qwen3_moe", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory was made
    assert sorted(p.name for p in out.iterdir()) == ["export_manifest.json"]


def test_unwritable_parent(mcore, tmp_path):
    """A parent that cannot hold a directory (works as root too, unlike chmod)."""
    m = build_gpt(TinySpec())
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(RuntimeError, match=r"cannot export to .*afile/hf"):
        export_to_hf(m, blocker / "hf", arch="qwen3_moe")
    assert blocker.read_text() == "x"


def test_bad_dtype(mcore, tmp_path):
    m = build_gpt(TinySpec())
    with pytest.raises(ValueError, match="unsupported export dtype 'int8'"):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", dtype="int8")


def test_learned_absolute_positions_refused(mcore, tmp_path):
    """A real GPTModel with learned absolute position embeddings: no supported HF class has
    them, so dropping them would change the logits; the rule refuses it before anything is
    written."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_export_hooks.testing.cpu import transformer_config

    spec = TinySpec(num_experts=None, moe_ffn_hidden_size=None, qk_layernorm=False)
    m = GPTModel(config=transformer_config(spec), transformer_layer_spec=get_gpt_layer_local_spec(),
                 vocab_size=spec.vocab_size, max_sequence_length=spec.max_seq_len,
                 position_embedding_type="learned_absolute")
    with pytest.raises(ArchMismatchError, match=r"llama needs rotary embeddings"):
        export_to_hf(m, tmp_path / "hf", arch="llama")
    _nothing_written(tmp_path)


def test_unmapped_parameters_are_named_in_a_warning(mcore, tmp_path):
    """Multi-token-prediction layers (HF drops ``mtp.*``) and any other parameter outside the
    mapped parts are not exported, and the log says so (never silently).  A handler of its
    own, not caplog: the forward-stack job runs pytest with its logging plugin off."""
    import io
    import logging

    m = build_gpt(TinySpec())
    m.mtp = torch.nn.Linear(4, 4)  # the name Megatron gives its MTP block
    m.extra_head = torch.nn.Linear(4, 2)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("nemo_export_hooks")
    logger.addHandler(handler)
    try:
        res = export_to_hf(m, tmp_path / "hf", arch="qwen3_moe")
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert "2 multi-token-prediction parameters (mtp.*) are not exported" in text
    assert "['extra_head.bias', 'extra_head.weight']" in text
    assert res.num_tensors > 0


# -- hf_config_overrides that contradict the model (issue 15, item 1) ---------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vocab_size": 7}, r"vocab_size=7 \(the model has 128\).*model.embed_tokens.weight is \[128, 64\] in the export, \[7, 64\]"),
        ({"hidden_size": 32}, r"hidden_size=32 \(the model has 64\).*shapes do not match"),
        ({"num_attention_heads": 8}, r"num_attention_heads=8 \(the model has 4\).*q_proj.weight is \[64, 64\] in the export, \[128, 64\]"),
        ({"num_key_value_heads": 4}, r"num_key_value_heads=4 \(the model has 2\).*k_proj.weight is \[32, 64\] in the export, \[64, 64\]"),
        ({"moe_intermediate_size": 7}, r"moe_intermediate_size=7 \(the model has 32\).*gate_proj.weight is \[32, 64\] in the export, \[7, 64\]"),
        ({"head_dim": 8}, r"head_dim=8 \(the model has 16\).*q_norm.weight is \[16\] in the export, \[8\]"),
        ({"model_type": "llama"}, r"model_type='llama' contradicts the model, whose value is 'qwen3_moe'"),
        ({"architectures": ["FooForCausalLM"]}, r"transformers has no class 'FooForCausalLM' \(the model's is \['Qwen3MoeForCausalLM'\]\)"),
        ({"architectures": ["LlamaForCausalLM"]}, r"LlamaForCausalLM is a 'llama' class, the model is 'qwen3_moe'"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9 is more than the 4 experts"),
        ({"num_experts_per_tok": 3}, r"num_experts_per_tok=3 contradicts the model, whose value is 2"),
        ({"rms_norm_eps": "abc"}, r"rms_norm_eps='abc': must be a finite number, got str \(the model's value is 1e-06\)"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers=0 must be positive"),
        # an int beyond a float's range (issue 24, item 5): named, not an OverflowError
        ({"rope_theta": 10**400}, r"rope_theta=1000000.*\(401 characters\): must be a finite number, got int"),
        ({"rope_theta": float("inf")}, r"rope_theta=inf: must be a finite number"),
    ],
)
def test_contradicting_overrides_refused_before_writing(mcore, tmp_path, overrides, message):
    m = build_gpt(TinySpec())
    with pytest.raises(ValueError, match=message):
        export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", hf_config_overrides=overrides)
    _nothing_written(tmp_path)


def test_harmless_overrides_are_written(mcore, tmp_path):
    import json

    m = build_gpt(TinySpec())
    ov = {"max_position_embeddings": 4096, "rope_theta": 500000.0, "eos_token_id": 3, "custom_note": "x"}
    export_to_hf(m, tmp_path / "hf", arch="qwen3_moe", hf_config_overrides=ov)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: cfg[k] for k in ov} == ov


def test_structural_override_checked_at_callback_setup(mcore):
    """The callback's setup check (check_hf_keys=True) sees the overrides' shapes too."""
    from nemo_export_hooks.exporter.api import prepare_export

    m = build_gpt(TinySpec())
    with pytest.raises(ValueError, match=r"vocab_size=7 \(the model has 128\)"):
        prepare_export(m, "qwen3_moe", hf_config_overrides={"vocab_size": 7}, check_hf_keys=True)


def test_name_check_beside_the_write_refuses_before_publishing(mcore, tmp_path):
    """export_to_hf compares with the transformers class on a thread while the parts are
    written (issue 17: the first export no longer waits for the meta-device build); a mismatch
    raises the same ValueError, and neither the export nor its staging directory remains."""
    m = build_gpt(TinySpec())
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match=r"vocab_size=7 \(the model has 128\)"):
        export_to_hf(m, out, arch="qwen3_moe", hf_config_overrides={"vocab_size": 7})
    assert not out.exists() and _no_staging(tmp_path)
    res = export_to_hf(m, out, arch="qwen3_moe")  # the same directory is free for a good export
    assert {"plan_s", "write_s", "commit_s"} <= set(res.phases) and all(v >= 0 for v in res.phases.values())


# -- the output path is checked before writing; I/O errors name the file (issue 15, item 5)
def _no_staging(tmp_path):
    return not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_dangling_symlink_out_dir_refused_before_writing(mcore, tmp_path):
    m = build_gpt(TinySpec())
    out = tmp_path / "hf"
    out.symlink_to(tmp_path / "gone")
    with pytest.raises(RuntimeError, match=r"is a dangling symlink \(to .*gone\); an export is published by renaming"):
        export_to_hf(m, out, arch="qwen3_moe")
    assert out.is_symlink() and _no_staging(tmp_path)


def test_symlink_to_empty_dir_out_dir_refused(mcore, tmp_path):
    m = build_gpt(TinySpec())
    (tmp_path / "empty").mkdir()
    out = tmp_path / "hf"
    out.symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(RuntimeError, match=r"hf is a symlink \(to .*empty\).*give the real directory"):
        export_to_hf(m, out, arch="qwen3_moe", overwrite=True)
    assert out.is_symlink() and (tmp_path / "empty").is_dir() and _no_staging(tmp_path)


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_side_file_disk_full_names_the_file(mcore, tmp_path):
    """ENOSPC while writing only config.json (the kernel's /dev/full answers every write
    with it) names config.json."""
    import errno

    from nemo_export_hooks.exporter.api import _write_side_files, prepare_export

    prepared = prepare_export(build_gpt(TinySpec()), "qwen3_moe")
    (tmp_path / "config.json").symlink_to("/dev/full")
    with pytest.raises(OSError, match=r"cannot write .*config.json: No space left on device") as ei:
        _write_side_files(tmp_path, prepared, None)
    assert ei.value.errno == errno.ENOSPC


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_manifest_disk_full_names_the_file(tmp_path, monkeypatch):
    """The manifest's temporary file on a full disk: the error names the manifest."""
    import uuid

    from nemo_export_hooks import publish as P

    token = uuid.UUID("0" * 32)
    monkeypatch.setattr(P.uuid, "uuid4", lambda: token)
    (tmp_path / f".{P.MANIFEST_NAME}.tmp-{token.hex[:8]}").symlink_to("/dev/full")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / P.MANIFEST_NAME}: No space left on device"):
        P.write_manifest(tmp_path, {"step": 1})


def test_qwen2_head_dim_must_be_derivable(mcore, tmp_path):
    """vLLM's Qwen2 computes head_dim as hidden_size / heads and ignores config.json's: a
    qwen2 export whose kv_channels differ would load and compute something else there."""
    model = build_gpt(TinySpec(num_experts=None, qk_layernorm=False, add_qkv_bias=True, kv_channels=32))
    with pytest.raises(ArchMismatchError, match=r"hidden_size / num_attention_heads = 16 .*kv_channels=32"):
        export_to_hf(model, tmp_path / "out", arch="qwen2")
    _nothing_written(tmp_path)
    export_to_hf(build_gpt(TinySpec(num_experts=None, qk_layernorm=False, add_qkv_bias=True)), tmp_path / "ok", arch="qwen2")


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_index_disk_full_names_the_file(tmp_path, monkeypatch):
    """The index's temporary file on a full disk (issue 24, item 7): the error names the
    index, and no temporary file is left."""
    import errno
    import uuid

    from safetensors.torch import save_file

    from nemo_export_hooks.exporter import writer as W

    token = uuid.UUID("0" * 32)
    monkeypatch.setattr(W.uuid, "uuid4", lambda: token)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "rank00000-0.safetensors"))
    (tmp_path / f".{W.INDEX_NAME}.tmp-{token.hex[:8]}").symlink_to("/dev/full")
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / W.INDEX_NAME}: No space left on device") as ei:
        W.finalize_shards(tmp_path, {"a": "rank00000-0.safetensors"})
    assert ei.value.errno == errno.ENOSPC
    assert not any(p.name.startswith(f".{W.INDEX_NAME}.tmp") for p in tmp_path.iterdir())
