"""NeMo 2 training recipes with Hugging Face exports beside every checkpoint.

Each recipe is a Hydra app over ``conf/`` (``conf/<recipe>.yaml`` + the ``hf_export`` group,
which ships inside the package and is found through ``pkg://nemo_export_hooks.conf``)
and turns the export on with one flag, ``hf_export.enabled=true``:

* ``pretrain_qwen3_moe``: pretraining of a Qwen3-MoE-style model (mock or indexed data).
* ``finetune_qwen3_moe``: full-parameter SFT from a NeMo 2 checkpoint.
* ``qat_qwen3_moe``: ModelOpt PTQ -> quantization-aware fine-tune -> quantized HF exports.

Each module has ``build(cfg)`` (constructs the NeMo objects, trains nothing), ``run(cfg)``
and a Hydra ``main``.  Training needs GPUs (NeMo 2 with MegatronStrategy does not run on CPU).
"""
