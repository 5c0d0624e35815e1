"""Megatron-Bridge quantization-aware training (QAT) of a Qwen3-MoE-style model: ModelOpt
quantizes the model right after Bridge builds it (a pre-wrap hook, before DDP), then Bridge trains
the fake-quantized forward; every checkpoint gets a quantized Hugging Face export (ModelOpt's unified
format: NVFP4 or FP8 weights + scales, ``hf_quant_config.json``) inside it, ``iter_NNNNNNN/hf``.

Command line::

    torchrun --nproc-per-node 8 recipes/bridge_qat_qwen3_moe.py hf_export.enabled=true \\
        quant.format=nvfp4 model.expert_model_parallel_size=8 checkpoint.save=/ckpt/qat1

``quant.format``: ``nvfp4`` (default, ``mtq.NVFP4_DEFAULT_CFG``) or ``fp8`` (``mtq.FP8_DEFAULT_CFG``);
``quant.calib_steps`` (default 4) forward passes of ``quant.calib_seq`` tokens calibrate the
amaxes (random tokens; the weight amaxes do not depend on data). Everything else as in
``bridge_pretrain_qwen3_moe`` (Bridge's Hydra overrides; ``hf_export.*`` from
the packaged ``hf_export/qat.yaml``, whose ``expect_quant`` makes the callback refuse, at setup, a model
without quantizers of that format).

Bridge's checkpoints hold ModelOpt's state (``modelopt_state/``); a run resumed from one
(``checkpoint.load``) restores the quantizers through Bridge's ``restore_modelopt_state`` instead
of quantizing again. Bridge's own QAT flow (``examples/quantization``) quantizes in a separate job
and trains from that checkpoint; this recipe does both in one run. Pipeline parallelism is not
supported by the calibration loop here (one forward per rank).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import bridge_pretrain_qwen3_moe as base  # noqa: E402

FORMATS = {"nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4"), "fp8": ("FP8_DEFAULT_CFG", "FP8")}  # what the exporter writes
QUANT_DEFAULTS = {"format": "nvfp4", "calib_steps": 4, "calib_seq": 256}


def split_quant(overrides: Sequence[str]) -> tuple[list[str], dict]:
    """``quant.*`` overrides (a dict, checked) apart from the rest."""
    rest, quant = [], dict(QUANT_DEFAULTS)
    for o in overrides:
        if o.startswith("quant."):
            key, _, value = o[len("quant."):].partition("=")
            if key not in QUANT_DEFAULTS or not value:
                raise ValueError(f"{o!r}: quant options are {sorted(QUANT_DEFAULTS)} (quant.key=value)")
            quant[key] = value if key == "format" else int(value)
        else:
            rest.append(o)
    quant["format"] = str(quant["format"]).lower()
    if quant["format"] not in FORMATS:
        raise ValueError(f"quant.format={quant['format']!r}: the HF exporter writes {sorted(FORMATS)}")
    return rest, quant


def quantize_hook(quant: dict):
    """Bridge pre-wrap hook: ``mtq.quantize`` each model chunk with a short calibration loop."""
    fmt, steps, seq = quant["format"], quant["calib_steps"], quant["calib_seq"]

    def hook(model):
        import modelopt.torch.quantization as mtq
        import torch

        qcfg = getattr(mtq, FORMATS[fmt][0])

        def calibrate(m):
            g = torch.Generator(device="cuda").manual_seed(1234)  # the same tokens on every rank
            with torch.no_grad():
                for _ in range(steps):
                    ids = torch.randint(0, m.vocab_size, (1, seq), device="cuda", generator=g)
                    pos = torch.arange(seq, device="cuda").unsqueeze(0)
                    m(ids, pos, attention_mask=None)

        out = []
        for m in model:
            m.cuda()
            was = m.training
            m.eval()
            m = mtq.quantize(m, qcfg, calibrate)
            m.train(was)
            out.append(m)
        return out

    return hook


def compose(overrides: Sequence[str] = ()):
    """(ConfigContainer with the quantize hook registered, ``hf_export`` node, quant options)."""
    from nemo_export_hooks.extras import require

    rest, quant = split_quant(overrides)
    require("quant", "modelopt.torch.quantization", "recipes/bridge_qat_qwen3_moe.py (ModelOpt quantization)")
    cfg, hf = base.compose(rest, hf_group="qat")
    want = FORMATS[quant["format"]][1]
    if not any(o.lstrip("+").startswith("hf_export.expect_quant") for o in rest):
        hf.expect_quant = want
    elif hf.expect_quant and str(hf.expect_quant).upper() != want:
        raise ValueError(f"hf_export.expect_quant={hf.expect_quant!r} does not match quant.format={quant['format']!r}")
    if int(getattr(cfg.model, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise ValueError("bridge_qat_qwen3_moe: the calibration loop runs one forward per rank; "
                         "model.pipeline_model_parallel_size must be 1")
    if _resumes_quantized(cfg):
        cfg.model.restore_modelopt_state = True  # Bridge restores the quantizers, then loads the weights
    else:
        cfg.model.register_pre_wrap_hook(quantize_hook(quant))
    return cfg, hf, quant


def _resumes_quantized(cfg) -> bool:
    load = getattr(cfg.checkpoint, "load", None)
    if not load or not Path(str(load)).exists():
        return False
    from megatron.bridge.training.post_training.checkpointing import has_modelopt_state

    return bool(has_modelopt_state(str(load)))


def main(argv: Sequence[str] | None = None) -> None:
    cfg, hf, _ = compose(sys.argv[1:] if argv is None else argv)
    base.run(cfg, hf)


if __name__ == "__main__":
    main()
