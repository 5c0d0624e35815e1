"""NeMo 2 full-parameter fine-tuning of a Qwen3-MoE model, publishing a Hugging Face
checkpoint (with the model's tokenizer) beside every training checkpoint.

Command line::

    torchrun --nproc-per-node 8 recipes/finetune_qwen3_moe.py \\
        restore_from=/ckpts/qwen3_30b_a3b data.dataset_root=/data/sft hf_export.enabled=true

``restore_from`` is a NeMo 2 checkpoint, e.g. made from the Hugging Face model with
``llm.import_ckpt(model=llm.Qwen3Model(llm.Qwen3Config30B_A3B()), source="hf://Qwen/Qwen3-30B-A3B")``.
The data directory holds ``training.jsonl`` / ``validation.jsonl`` (``{"input", "output"}``).

PEFT (LoRA) is not offered here on purpose: the exported checkpoint is the full model, and a
LoRA-wrapped model does not fit the Qwen3-MoE layout (the callback would refuse at setup).
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

CONFIG_NAME = "finetune_qwen3_moe"


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    return common.compose(CONFIG_NAME, overrides)


def build(cfg: DictConfig) -> common.Recipe:
    """All objects ``llm.finetune`` takes; trains nothing.  The model is the checkpoint path:
    NeMo rebuilds it from the checkpoint's context and restores its weights."""
    return common.Recipe(
        model=str(cfg.restore_from),
        data=common.finetune_data(cfg),
        trainer=common.build_trainer(cfg),
        log=common.build_log(cfg),
        resume=common.build_resume(cfg, restore_from=cfg.restore_from),
        optim=common.build_optim(cfg),
    )


def run(cfg: DictConfig):
    from nemo.collections import llm

    return llm.finetune(**build(cfg).kwargs(), peft=None)


@hydra.main(config_path="../conf", config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
