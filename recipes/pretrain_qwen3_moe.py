"""NeMo 2 pretraining of a Qwen3-MoE-style model, publishing a Hugging Face checkpoint beside
every training checkpoint.

Command line (8 GPUs, expert parallel 8, HF export on)::

    torchrun --nproc-per-node 8 recipes/pretrain_qwen3_moe.py hf_export.enabled=true

More overrides, all Hydra/OmegaConf::

    torchrun --nproc-per-node 8 recipes/pretrain_qwen3_moe.py hf_export.enabled=true \\
        hf_export.keep_last_k=3 hf_export.every_n_train_steps=500 \\
        trainer.max_steps=20000 checkpoint.every_n_train_steps=1000 \\
        model.num_layers=24 data.kind=pretraining data.paths=[/data/corpus_text_document]

Exports land in ``<log_dir>/<name>/checkpoints/hf/<checkpoint name>`` (NeMo's checkpoint
directory holds only checkpoints; see ``nemo_export_hooks.config``), with a ``latest`` link.
From Python::

    from recipes import pretrain_qwen3_moe as r
    cfg = r.compose(["hf_export.enabled=true", "trainer.devices=1"])
    r.run(cfg)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `recipes` and the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig, OmegaConf

from recipes import common

CONFIG_NAME = "pretrain_qwen3_moe"


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    return common.compose(CONFIG_NAME, overrides)


def model_config(cfg: DictConfig):
    """NeMo's ``Qwen3MoEConfig`` from ``cfg.model`` (any field of it may be set there).
    NeMo 2.7 does not re-export it from ``nemo.collections.llm``; it lives in its module."""
    from nemo.collections.llm.gpt.model.qwen3 import Qwen3MoEConfig

    return Qwen3MoEConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def build_data(cfg: DictConfig):
    from nemo.collections import llm

    d = cfg.data
    tokenizer = common.build_tokenizer(d.tokenizer, vocab_size=cfg.model.vocab_size)
    if d.kind == "mock":
        return llm.MockDataModule(
            seq_length=d.seq_length, global_batch_size=d.global_batch_size, micro_batch_size=d.micro_batch_size, tokenizer=tokenizer
        )
    if d.kind == "pretraining":
        if not d.paths:
            raise ValueError("data.kind=pretraining needs data.paths (Megatron indexed dataset prefixes)")
        return llm.PreTrainingDataModule(
            paths=list(d.paths), seq_length=d.seq_length, global_batch_size=d.global_batch_size,
            micro_batch_size=d.micro_batch_size, tokenizer=tokenizer,
        )
    raise ValueError(f"unknown data.kind {d.kind!r} (mock | pretraining)")


def build(cfg: DictConfig) -> common.Recipe:
    """All objects ``llm.pretrain`` takes; trains nothing."""
    from nemo.collections import llm

    return common.Recipe(
        model=llm.Qwen3Model(model_config(cfg)),
        data=build_data(cfg),
        trainer=common.build_trainer(cfg),
        log=common.build_log(cfg),
        resume=common.build_resume(cfg),
        optim=common.build_optim(cfg),
    )


def run(cfg: DictConfig):
    from nemo.collections import llm

    return llm.pretrain(**build(cfg).kwargs())


@hydra.main(config_path="../conf", config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
