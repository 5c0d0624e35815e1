"""A LightningModule wrapping a tiny Megatron-Core ``GPTModel`` plus synthetic data.

Shared by the callback tests, the CPU demo and benchmarks.  The GPTModel sits at
``self.module``, the way NeMo's LightningModules hold theirs, so the exporter finds it by
unwrapping ``.module``.  Megatron's parallel state must be initialised first
(:func:`nemo_export_hooks.testing.cpu.init_single_process`); on a CPU-only machine that also
applies the shims that let Megatron-Core's forward run there.

The data is learnable (each sample is an affine sequence ``x[t+1] = (a * x[t] + b) mod V``),
so the loss falls within a few dozen steps and exports taken at different steps differ.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is an optional extra
    import pytorch_lightning as pl  # type: ignore[no-redef]

from .cpu import TinySpec, build_gpt

__all__ = ["SyntheticTokens", "TinyMegatronLM", "InjectedFailure"]


class InjectedFailure(RuntimeError):
    """Raised by :class:`TinyMegatronLM` at ``fail_at_step`` (to test crash handling)."""


class SyntheticTokens(Dataset):
    """``num_samples`` deterministic token sequences of length ``seq_len + 1``."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(1, 8, (num_samples, 1), generator=g)
        b = torch.randint(0, vocab_size, (num_samples, 1), generator=g)
        x0 = torch.randint(0, vocab_size, (num_samples, 1), generator=g)
        seq = [x0]
        for _ in range(seq_len):
            seq.append((a * seq[-1] + b) % vocab_size)
        self.data = torch.cat(seq, dim=1)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _causal_inputs(b: int, s: int):
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # True = masked; Megatron's default mask would be built on "cuda"
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    return position_ids, mask


class TinyMegatronLM(pl.LightningModule):
    """Next-token training of a tiny Megatron-Core GPT (Qwen3-MoE-like by default)."""

    def __init__(
        self,
        spec: Optional[TinySpec] = None,
        seq_len: int = 32,
        batch_size: int = 4,
        num_samples: int = 256,
        lr: float = 3e-3,
        seed: int = 1234,
        fail_at_step: Optional[int] = None,
    ):
        super().__init__()
        self.spec = spec or TinySpec()
        if seq_len > self.spec.max_seq_len:
            raise ValueError(f"seq_len {seq_len} > the model's max_seq_len {self.spec.max_seq_len}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.lr = lr
        self.seed = seed
        self.fail_at_step = fail_at_step
        self.module = build_gpt(self.spec, seed=seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``."""
        pos, mask = _causal_inputs(*tokens.shape)
        return self.module(input_ids=tokens, position_ids=pos, attention_mask=mask)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise InjectedFailure(f"injected failure at step {self.global_step}")
        tokens, labels = batch[:, :-1], batch[:, 1:]
        pos, mask = _causal_inputs(*tokens.shape)
        # with labels, Megatron returns the per-token loss [batch, seq]
        loss = self.module(input_ids=tokens, position_ids=pos, attention_mask=mask, labels=labels).float().mean()
        self.log("train_loss", loss, prog_bar=False, on_step=True, on_epoch=False, batch_size=tokens.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.module.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        ds = SyntheticTokens(self.spec.vocab_size, self.seq_len, self.num_samples, seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, drop_last=True)
