"""Shared fixtures: Megatron's parallel state on one CPU process (gloo), and helpers that
export a model and compare it with what `transformers` computes from the export."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def mcore():
    """Initialise torch.distributed (world size 1, gloo) and Megatron parallel state once."""
    from nemo_export_hooks.testing.cpu import init_single_process

    init_single_process()
    yield


def load_hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), torch_dtype=dtype, output_loading_info=True, attn_implementation="eager"
    )
    model.eval()
    # transformers 4.x reports lists, 5.x sets: normalise to sorted lists
    info = {k: sorted(map(str, v)) if isinstance(v, (list, set, tuple)) else v for k, v in info.items()}
    return model, info


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def tokens_for(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def read_export(path):
    """Every tensor of the ``*.safetensors`` files in ``path`` (name -> tensor)."""
    from safetensors import safe_open

    out = {}
    for fn in sorted(path.glob("*.safetensors")):
        with safe_open(str(fn), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
