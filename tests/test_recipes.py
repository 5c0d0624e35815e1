"""Hydra config group ``hf_export`` (packaged, ``nemo_export_hooks/conf``), the NeMo 2 recipes in ``recipes/`` and NeMo's
ModelCheckpoint driving the callback, all on CPU (nothing here trains with MegatronStrategy:
Megatron's optimizer needs CUDA)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from nemo_export_hooks.callback import HFExportCallback, callbacks_from_cfg  # noqa: E402
from nemo_export_hooks.config import ExportConfig  # noqa: E402
from recipes import common  # noqa: E402
from recipes import finetune_qwen3_moe, pretrain_qwen3_moe, qat_qwen3_moe  # noqa: E402

REQUIRED = {
    "pretrain_qwen3_moe": [],
    "finetune_qwen3_moe": ["restore_from=/ckpt/base", "data.dataset_root=/data/sft"],
    "qat_qwen3_moe": ["restore_from=/ckpt/base", "data.dataset_root=/data/sft"],
}
CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "parallel.expert_model_parallel_size=1"]


def _nemo_lightning():
    try:
        from nemo import lightning as nl
    except Exception as e:  # pragma: no cover - nemo-toolkit is the [nemo] extra
        pytest.skip(f"nemo.lightning not importable: {e}")
    return nl


# -- the config group ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["default", "qat"])
def test_hf_export_group_matches_export_config(variant):
    node = common.compose(f"hf_export/{variant}").hf_export
    assert set(node.keys()) == {f.name for f in dataclasses.fields(ExportConfig)}
    assert node.enabled is False and OmegaConf.is_missing(node, "arch")
    # the YAML is valid against the structured schema once arch is set
    cfg = ExportConfig.from_any(node, arch="qwen3_moe", enabled=True).validate()
    schema = OmegaConf.merge(OmegaConf.structured(ExportConfig), node)  # types check too
    assert schema.on_checkpoint_save is True and schema.async_write is True
    if variant == "qat":
        assert cfg.expect_quant == "NVFP4" and cfg.on_busy == "wait" and cfg.keep_last_k == 3
    else:
        assert cfg.expect_quant is None and cfg.on_busy == "skip" and cfg.tokenizer == "auto"


def test_enabled_without_arch_is_a_clear_error():
    node = common.compose("hf_export/default", ["hf_export.enabled=true"]).hf_export
    with pytest.raises(ValueError, match="arch is required"):
        callbacks_from_cfg(node)


# -- the recipes: one flag ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_one_flag_turns_the_export_on(name):
    off = common.compose(name, REQUIRED[name])
    assert off.hf_export.enabled is False and callbacks_from_cfg(off) == []
    on = common.compose(name, REQUIRED[name] + ["hf_export.enabled=true"])
    (cb,) = callbacks_from_cfg(on)
    assert isinstance(cb, HFExportCallback)
    assert cb.config.arch == "qwen3_moe" and cb.config.on_checkpoint_save
    if name == "qat_qwen3_moe":
        assert cb.config.expect_quant.upper() == "NVFP4" and cb.config.keep_last_k == 3
    # Hydra overrides reach the callback, and bad values fail at construction
    (cb,) = callbacks_from_cfg(common.compose(name, REQUIRED[name] + ["hf_export.enabled=true", "hf_export.keep_last_k=2", "+hf_export.hf_config_overrides.foo=1"]))
    assert cb.config.keep_last_k == 2 and cb.config.hf_config_overrides == {"foo": 1}
    with pytest.raises(ValueError, match="on_busy"):
        callbacks_from_cfg(common.compose(name, REQUIRED[name] + ["hf_export.enabled=true", "hf_export.on_busy=never"]))


def test_recipe_modules_compose_their_own_config():
    assert pretrain_qwen3_moe.compose().name == "qwen3_moe_pretrain"
    assert finetune_qwen3_moe.compose(REQUIRED["finetune_qwen3_moe"]).name == "qwen3_moe_finetune"
    q = qat_qwen3_moe.compose(REQUIRED["qat_qwen3_moe"] + ["hf_export.enabled=true"])
    qat_qwen3_moe.check(q)
    assert q.qat.ptq_checkpoint == "./nemo_experiments/qwen3_moe_qat/ptq"
    with pytest.raises(ValueError, match="does not match"):
        qat_qwen3_moe.check(qat_qwen3_moe.compose(REQUIRED["qat_qwen3_moe"] + ["hf_export.enabled=true", "hf_export.expect_quant=FP8"]))
    with pytest.raises(ValueError, match="exporter writes"):
        qat_qwen3_moe.check(qat_qwen3_moe.compose(REQUIRED["qat_qwen3_moe"] + ["qat.algorithm=int8_sq"]))
    # fp8 QAT: expect_quant follows qat.algorithm
    fp8 = qat_qwen3_moe.compose(REQUIRED["qat_qwen3_moe"] + ["hf_export.enabled=true", "qat.algorithm=fp8"])
    qat_qwen3_moe.check(fp8)
    assert callbacks_from_cfg(fp8)[0].config.expect_quant == "fp8"


def test_command_line_shows_the_flag():
    """The documented command line, with Hydra's --cfg job (print the config, run nothing)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "recipes/pretrain_qwen3_moe.py", "--cfg", "job", "--resolve", "hf_export.enabled=true", "hf_export.keep_last_k=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = OmegaConf.create(r.stdout)
    assert cfg.hf_export.enabled is True and cfg.hf_export.keep_last_k == 3 and cfg.hf_export.arch == "qwen3_moe"
    assert cfg.model.seq_length == cfg.data.seq_length
    for mod in (pretrain_qwen3_moe, finetune_qwen3_moe, qat_qwen3_moe):
        assert "hf_export.enabled=true" in mod.__doc__


# -- NeMo objects, built (not trained) on CPU ---------------------------------------------
def test_trainer_side_objects_build_on_cpu():
    nl = _nemo_lightning()
    cfg = common.compose("pretrain_qwen3_moe", CPU + ["hf_export.enabled=true", "checkpoint.every_n_train_steps=7"])
    trainer = common.build_trainer(cfg)  # nl.Trainer deep-copies its callbacks (IOMixin): they must copy
    exports = [c for c in trainer.callbacks if isinstance(c, HFExportCallback)]
    assert len(exports) == 1 and exports[0].config.arch == "qwen3_moe"
    assert isinstance(trainer.strategy, nl.MegatronStrategy)
    assert trainer.strategy.async_save is True
    assert trainer.max_steps == cfg.trainer.max_steps
    log = common.build_log(cfg)
    assert isinstance(log.ckpt, nl.ModelCheckpoint) and log.ckpt._every_n_train_steps == 7
    assert log.ckpt.save_top_k == 2
    resume = common.build_resume(cfg, restore_from="/ckpt/base")
    assert resume.resume_if_exists and resume.restore_config.path == "/ckpt/base"
    optim = common.build_optim(cfg)
    assert optim.config.lr == cfg.optim.lr and optim.config.bf16 and optim.config.use_distributed_optimizer
    off = common.build_trainer(common.compose("pretrain_qwen3_moe", CPU))
    assert not any(isinstance(c, HFExportCallback) for c in off.callbacks)


def test_full_recipe_objects_build_when_nemo_llm_imports():
    """Model and data need ``nemo.collections.llm`` (its CPU-side deps, e.g. einops, are not
    in the pinned test environment; on a NeMo container this runs)."""
    try:
        from nemo.collections import llm
    except Exception as e:
        pytest.skip(f"nemo.collections.llm not importable here: {type(e).__name__}: {e}")
    # moe_permute_fusion (NeMo's default) needs Transformer Engine, absent on CPU
    cfg = common.compose(
        "pretrain_qwen3_moe", CPU + ["hf_export.enabled=true", "model.num_layers=2", "+model.moe_permute_fusion=false"]
    )
    mc = pretrain_qwen3_moe.model_config(cfg)
    from nemo.collections.llm.gpt.model.qwen3 import Qwen3MoEConfig

    assert isinstance(mc, Qwen3MoEConfig) and mc.num_layers == 2 and mc.num_moe_experts == 32
    recipe = pretrain_qwen3_moe.build(cfg)
    assert isinstance(recipe.model, llm.Qwen3Model) and isinstance(recipe.data, llm.MockDataModule)
    assert set(recipe.kwargs()) == {"model", "data", "trainer", "log", "resume", "optim"}


def test_nemo_model_checkpoint_drives_exports_on_cpu(mcore, tmp_path):
    """NeMo's ModelCheckpoint save path (unfinished markers, finalize, top-k) with a plain
    Lightning strategy on CPU: every save gets an export in <ckpt dir>/hf/<name>."""
    nl = _nemo_lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint as PTLModelCheckpoint

    from nemo_export_hooks import publish as P
    from nemo_export_hooks.testing.lightning import TinyMegatronLM

    class NeMoCkpt(nl.ModelCheckpoint):
        def on_train_start(self, trainer, pl_module):
            # NeMo's version also sets up experiment-manager files (needs pandas, not pinned)
            PTLModelCheckpoint.on_train_start(self, trainer, pl_module)

    ck_dir = tmp_path / "checkpoints"
    ck = NeMoCkpt(dirpath=str(ck_dir), filename="{model_name}--{train_loss:.2f}-{step}", every_n_train_steps=2,
                  save_top_k=1, save_last=True, monitor="train_loss", always_save_context=False, save_context_on_train_end=False)
    cb = HFExportCallback(arch="qwen3_moe", on_busy="wait", keep_last_k=2)
    trainer = nl.Trainer(accelerator="cpu", devices=1, max_steps=6, callbacks=[cb, ck], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(TinyMegatronLM(seq_len=16, batch_size=2))

    hf = ck_dir / "hf"
    assert [e["step"] for e in cb.exports] == [2, 4, 6]  # the "-last" saves at the same steps add none
    names = sorted(p.name for p in hf.iterdir())
    assert len(names) == 4 and names[:2] == ["latest", "latest.txt"]  # keep_last_k=2
    newest = Path(cb.exports[-1]["path"])
    assert newest.parent == hf and newest.name.endswith("-step=6") and os.readlink(hf / "latest") == newest.name
    assert P.verify_export(newest) == [] and P.read_manifest(newest)["checkpoint"].endswith("-step=6.ckpt")
    # NeMo's checkpoint directory holds no export beside its checkpoints (its top-k scan stays clean)
    assert not [p for p in ck_dir.iterdir() if p.is_dir() and p.name != "hf"]
    assert not [p for p in tmp_path.rglob(".*") if p.is_dir()]


def test_null_tokenizer_ids_fit_the_embedding():
    """MockDataModule draws ids below tokenizer.vocab_size; they must index the model's
    embedding (NullTokenizer(n) reports n + 1 because of its end-of-document id)."""
    from recipes.common import build_tokenizer

    tok = build_tokenizer(None, vocab_size=256)
    assert tok.vocab_size == 256 and tok.eod == 255
