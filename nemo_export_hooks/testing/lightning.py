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

from ..extras import lightning_pytorch

pl = lightning_pytorch("nemo_export_hooks.testing.lightning")

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


# -- a multi-rank smoke run (torchrun, gloo, CPU) -------------------------------------------
def main(argv=None) -> int:
    """``torchrun --nproc-per-node 2 -m nemo_export_hooks.testing.lightning --out DIR``

    Data-parallel training of :class:`TinyMegatronLM` with Lightning's DDP strategy on gloo
    (each rank its own data), :class:`~nemo_export_hooks.callback.HFExportCallback` exporting
    on every ``ModelCheckpoint`` save.  Exercises the callback's multi-rank protocol: its gloo
    groups, the agreement on finished exports, background collectives, a failure on one rank
    (``--fail-rank R --fail-exports N``: rank R cannot create its shard writer for the first N
    exports) turning into a failed export on every rank.  Rank 0 checks the results, prints
    one JSON line and exits 1 on a problem.
    """
    import argparse
    import json
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m nemo_export_hooks.testing.lightning")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--fail-exports", type=int, default=0)
    args = ap.parse_args(argv)

    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    from ..callback import HFExportCallback
    from ..exporter import writer as writer_mod
    from ..store.manifest import read_manifest
    from ..verify import verify_export
    from .cpu import init_single_process, megatron_logits

    torch.set_num_threads(1)
    init_single_process()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.fail_rank == rank and args.fail_exports > 0:
        left = {"n": args.fail_exports}
        orig_init = writer_mod.ShardWriter.__init__

        def failing_init(self, *a, **k):
            if left["n"] > 0:
                left["n"] -= 1
                raise OSError(28, f"No space left on device (injected on rank {rank})")
            orig_init(self, *a, **k)

        writer_mod.ShardWriter.__init__ = failing_init

    out = Path(args.out)
    model = TinyMegatronLM(seq_len=16, batch_size=2)
    cb = HFExportCallback(arch="qwen3_moe", dtype="float32", async_write=not args.sync, on_busy="wait")
    ck = ModelCheckpoint(dirpath=str(out / "checkpoints"), every_n_train_steps=args.every, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True),
        max_steps=args.steps,
        callbacks=[cb, ck],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)

    steps = [e["step"] for e in cb.exports]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "steps": steps, "failed": cb.failed})
    code = 0
    if rank == 0:
        problems = []
        if any(g["steps"] != steps or g["failed"] != cb.failed for g in gathered):
            problems.append(f"ranks disagree: {gathered}")
        expected = [s for s in range(args.every, args.steps + 1, args.every)][args.fail_exports if args.fail_rank is not None else 0:]
        if steps != expected:
            problems.append(f"exported steps {steps}, expected {expected}")
        for e in cb.exports:
            problems += [f"{e['path']}: {p}" for p in verify_export(e["path"])]
            if (read_manifest(e["path"]) or {}).get("world_size") != world:
                problems.append(f"{e['path']}: manifest world_size is not {world}")
        leftovers = [str(p) for p in out.rglob(".*") if p.is_dir()]
        if leftovers:
            problems.append(f"staging leftovers {leftovers}")
        diff = None
        if cb.exports:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(cb.exports[-1]["path"], dtype=torch.float32, attn_implementation="eager")
            tokens = torch.randint(0, model.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = (hf(input_ids=tokens).logits.float() - megatron_logits(model.module, tokens)).abs().max().item()
            if not diff < 1e-4:
                problems.append(f"logit diff {diff}")
        print(json.dumps({"ok": not problems, "world": world, "steps": steps, "failed": cb.failed, "diff": diff, "problems": problems}), flush=True)
        code = 1 if problems else 0
    dist.barrier()
    return code


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
