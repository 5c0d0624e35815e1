"""NeMo 2 quantization-aware training (QAT) of a Qwen3-MoE model with quantized Hugging
Face exports beside every checkpoint.

Command line::

    torchrun --nproc-per-node 8 recipes/qat_qwen3_moe.py \\
        restore_from=/ckpts/qwen3_30b_a3b data.dataset_root=/data/sft hf_export.enabled=true

Stages (``qat.stage``):

1. ``ptq``: ModelOpt post-training quantization with NeMo's ``llm.ptq``: calibrate on
   ``qat.calibration_dataset`` and save a quantized NeMo checkpoint (``export_format="nemo"``,
   weights plus ``modelopt_state``) to ``qat.ptq_checkpoint``.
2. ``train``: a short fine-tune from that checkpoint with ``llm.finetune``.  NeMo sees the
   ``modelopt_state`` and rebuilds the model with ModelOpt's layer spec and quantizers, so the
   fake-quantized forward is trained (QAT).  The ``hf_export/qat`` config group exports every
   checkpoint in ModelOpt's unified HF format (``qat.algorithm``: NVFP4 or FP8 weights and
   scales, ``hf_quant_config.json``), and its ``expect_quant`` makes the run fail at setup if
   the restored model carries no such quantizers.

``qat.stage=all`` runs both (PTQ is skipped if ``qat.ptq_checkpoint`` already exists).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from recipes import common

CONFIG_NAME = "qat_qwen3_moe"
EXPORTABLE = ("nvfp4", "fp8")  # the ModelOpt formats nemo_export_hooks writes


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    return common.compose(CONFIG_NAME, overrides)


def check(cfg: DictConfig) -> None:
    """Fail before any GPU work for a combination that cannot produce quantized exports."""
    q = cfg.qat
    if q.stage not in ("all", "ptq", "train"):
        raise ValueError(f"qat.stage must be all, ptq or train, got {q.stage!r}")
    if str(q.algorithm).lower() not in EXPORTABLE:
        raise ValueError(f"qat.algorithm={q.algorithm!r}: the HF exporter writes {list(EXPORTABLE)}")
    expect = cfg.hf_export.get("expect_quant")
    if cfg.hf_export.enabled and expect and str(expect).lower() != str(q.algorithm).lower():
        raise ValueError(f"hf_export.expect_quant={expect!r} does not match qat.algorithm={q.algorithm!r}")


def ptq_args(cfg: DictConfig) -> dict:
    """Arguments of ``llm.ptq`` (the NeMo quantization/export configs built lazily)."""
    from nemo_export_hooks.extras import require

    require("quant", "modelopt.torch.quantization", "recipes/qat_qwen3_moe.py (ModelOpt PTQ)")
    from nemo.collections.llm.modelopt import ExportConfig as NeMoQuantExport
    from nemo.collections.llm.modelopt import QuantizationConfig

    q = cfg.qat
    return dict(
        model_path=str(cfg.restore_from),
        export_config=NeMoQuantExport(path=str(q.ptq_checkpoint), export_format="nemo"),
        quantization_config=QuantizationConfig(
            algorithm=str(q.algorithm).lower(),
            calibration_dataset=q.calibration_dataset,
            calibration_dataset_size=q.calibration_dataset_size,
            calibration_batch_size=q.calibration_batch_size,
            calibration_seq_len=q.calibration_seq_len,
        ),
        calibration_tp=q.calibration_tp,
        calibration_ep=q.calibration_ep,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
    )


def build(cfg: DictConfig) -> common.Recipe:
    """The QAT fine-tune (stage 2): all objects ``llm.finetune`` takes; trains nothing."""
    check(cfg)
    ptq_ckpt = str(cfg.qat.ptq_checkpoint)
    return common.Recipe(
        model=ptq_ckpt,
        data=common.finetune_data(cfg),
        trainer=common.build_trainer(cfg),
        log=common.build_log(cfg),
        resume=common.build_resume(cfg, restore_from=ptq_ckpt),
        optim=common.build_optim(cfg),
    )


def run(cfg: DictConfig):
    from nemo.collections import llm

    check(cfg)
    if cfg.qat.stage in ("all", "ptq") and not (cfg.qat.stage == "all" and Path(cfg.qat.ptq_checkpoint).exists()):
        llm.ptq(**ptq_args(cfg))
    if cfg.qat.stage in ("all", "train"):
        return llm.finetune(**build(cfg).kwargs(), peft=None)


@hydra.main(config_path="../conf", config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
