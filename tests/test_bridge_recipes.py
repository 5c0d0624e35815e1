"""The CPU-side parts of the Megatron-Bridge recipes (``recipes/bridge_*.py``): importing them
needs no Megatron-Bridge (Python 3.12 + CUDA only), the ``hf_export.*`` / ``quant.*`` overrides
are split from Bridge's, and the ``hf_export`` node they build validates as an ``ExportConfig``.
Building the ConfigContainer and training are proved on the device (tests/gpu/bridge_smoke.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemo_export_hooks.config import ExportConfig  # noqa: E402
from recipes import bridge_pretrain_qwen3_moe as pre  # noqa: E402
from recipes import bridge_qat_qwen3_moe as qat  # noqa: E402


def test_import_needs_no_bridge():
    code = ("import sys; sys.path.insert(0, %r); import recipes.bridge_pretrain_qwen3_moe, recipes.bridge_qat_qwen3_moe; "
            "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'modelopt', 'torch'))))" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_split_overrides():
    bridge, hf = pre.split_overrides(["train.train_iters=10", "hf_export.enabled=true", "+hf_export.keep_last_k=2",
                                      "checkpoint.save=/c", "hf_exporter.x=1"])
    assert bridge == ["train.train_iters=10", "checkpoint.save=/c", "hf_exporter.x=1"]
    assert hf == ["enabled=true", "keep_last_k=2"]


def test_hf_export_node_is_an_export_config():
    node = pre.hf_export_node(["enabled=true", "async_write=false"])
    cfg = ExportConfig.from_any(node)
    assert (cfg.enabled, cfg.arch, cfg.async_write, cfg.tokenizer) == (True, "qwen3_moe", False, "auto")
    assert pre.hf_export_node([]).enabled is False  # off unless switched on
    q = ExportConfig.from_any(pre.hf_export_node(["enabled=true"], group="qat"))
    assert (q.expect_quant, q.on_busy, q.keep_last_k) == ("NVFP4", "wait", 3)


def test_hf_export_node_rejects_unknown_key():
    with pytest.raises(Exception, match="no_such_field"):
        ExportConfig.from_any(pre.hf_export_node(["no_such_field=1"]))


def test_split_quant():
    rest, q = qat.split_quant(["quant.format=FP8", "quant.calib_steps=2", "hf_export.enabled=true"])
    assert rest == ["hf_export.enabled=true"]
    assert q == {"format": "fp8", "calib_steps": 2, "calib_seq": 256}
    assert qat.split_quant([])[1]["format"] == "nvfp4"
    with pytest.raises(ValueError, match="quant.format='int4'"):
        qat.split_quant(["quant.format=int4"])
    with pytest.raises(ValueError, match="quant options are"):
        qat.split_quant(["quant.algo=fp8"])


def test_fit_to_image_turns_off_grad_acc_fusion_without_apex(caplog):
    """No APEX extension here: the recipe turns the fusion off and says why; a value the user set
    explicitly, or an image with the extension, is left alone."""
    import importlib.util
    import types

    if importlib.util.find_spec(pre.GRAD_ACC_FUSION_EXT) is not None:
        pytest.skip("APEX is installed here")
    m = types.SimpleNamespace(gradient_accumulation_fusion=True)
    with caplog.at_level("WARNING"):
        assert pre.fit_to_image(m) is True
    assert m.gradient_accumulation_fusion is False
    assert pre.GRAD_ACC_FUSION_EXT in caplog.text and "model.gradient_accumulation_fusion" in caplog.text
    m = types.SimpleNamespace(gradient_accumulation_fusion=True)
    assert pre.fit_to_image(m, explicit=True) is False and m.gradient_accumulation_fusion is True
    off = types.SimpleNamespace(gradient_accumulation_fusion=False)
    assert pre.fit_to_image(off) is False


def test_fit_to_image_keeps_fusion_when_apex_is_there(tmp_path, monkeypatch):
    (tmp_path / f"{pre.GRAD_ACC_FUSION_EXT}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import types

    m = types.SimpleNamespace(gradient_accumulation_fusion=True)
    assert pre.fit_to_image(m) is False and m.gradient_accumulation_fusion is True
