"""One placement object for both adapters (nemo_export_hooks/placement.py): what
``placement="auto"`` means for each, targets, export directories, the inside-a-checkpoint
policy and the tokenizer lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_export_hooks.config import ExportConfig
from nemo_export_hooks.placement import BRIDGE, LIGHTNING, Placement


def P(adapter, **kw) -> Placement:
    return Placement(ExportConfig(arch="qwen3_moe", **kw), adapter)


def test_auto_means_subdir_or_sibling_for_lightning_and_inside_for_bridge():
    assert P(LIGHTNING).mode() == "sibling" and P(LIGHTNING).mode(nemo_checkpointing=True) == "subdir"
    assert P(BRIDGE).mode() == "inside" and P(BRIDGE).inside and not P(LIGHTNING).inside
    assert not P(BRIDGE, dirpath="/x").inside  # dirpath overrides the placement
    assert P(LIGHTNING, placement="subdir").mode(nemo_checkpointing=False) == "subdir"
    with pytest.raises(ValueError, match="only Megatron-Bridge's iter_N directories allow; use auto, sibling or subdir with Lightning / NeMo"):
        P(LIGHTNING, placement="inside")


def test_targets_per_adapter(tmp_path):
    ck = tmp_path / "ck"
    # Lightning: a checkpoint's export beside it, a step without checkpoint beside too
    assert P(LIGHTNING).target("epoch=0-step=10", 10, 0, str(ck / "epoch=0-step=10.ckpt"), ck) == ck / "epoch=0-step=10-hf"
    assert P(LIGHTNING).target("step=5", 5, 0, None, ck) == ck / "step=5-hf"
    assert P(LIGHTNING).target("step=5", 5, 0, None, ck, mode="subdir") == ck / "hf" / "step=5"
    # Bridge: inside iter_N, and exports without a checkpoint in hf/ whatever the placement
    it = ck / "iter_0000004"
    assert P(BRIDGE).target("iter_0000004", 4, 0, str(it), ck) == it / "hf"
    assert P(BRIDGE).target("iter_0000003", 3, 0, None, ck) == ck / "hf" / "iter_0000003"
    assert P(BRIDGE, placement="sibling").target("iter_0000004", 4, 0, str(it), ck) == ck / "iter_0000004-hf"
    assert P(BRIDGE, placement="sibling").target("iter_0000003", 3, 0, None, ck) == ck / "hf" / "iter_0000003"
    d = P(BRIDGE, dirpath=str(tmp_path / "D"), filename="hf-{step:05d}")
    assert d.target("iter_0000002", 2, 0, str(it), None) == tmp_path / "D" / "hf-00002"


def test_export_dirs_per_adapter(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert P(LIGHTNING).export_dirs([a, b], a) == [a, b]
    assert P(LIGHTNING, every_n_train_steps=5).export_dirs([a], b, mode="subdir") == [a / "hf", b / "hf"]
    assert P(LIGHTNING, at_train_end=True).export_dirs([a], b) == [a, b]
    assert P(BRIDGE).export_dirs([a], a) == [a]
    assert P(BRIDGE, every_n_train_steps=5).export_dirs([a], a) == [a, a / "hf"]
    assert P(BRIDGE, placement="sibling", at_train_end=True).export_dirs([a], a) == [a, a / "hf"]
    assert P(BRIDGE).export_dirs([], None) == []
    assert P(BRIDGE, dirpath=str(tmp_path / "D")).export_dirs([a], a) == [tmp_path / "D"]


def test_tokenizer_lookup(tmp_path):
    class Saves:
        def save_pretrained(self, d):
            pass

    class Wrapper:
        tokenizer = Saves()

    s = Saves()
    assert P(LIGHTNING, tokenizer="auto").tokenizer() is None
    assert P(LIGHTNING, tokenizer="auto").tokenizer(found=[None, object(), s]) is s
    w = Wrapper()
    assert P(BRIDGE, tokenizer="auto").tokenizer(found=[w]) is w.tokenizer  # NeMo-style wrapper
    assert P(BRIDGE, tokenizer="auto").tokenizer(found=[None], model_dirs=[None, str(tmp_path / "no"), str(tmp_path)]) == str(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert P(LIGHTNING, tokenizer=str(tmp_path)).tokenizer() == str(tmp_path)
    assert P(LIGHTNING, tokenizer=s).tokenizer(found=[object()]) is s
    assert P(LIGHTNING).tokenizer() is None
