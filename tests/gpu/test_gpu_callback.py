"""The training hook on a GPU: a Lightning run (one GPU) of a real Transformer Engine Qwen3-MoE
(``TEGroupedMLP`` experts) with Lightning's ``ModelCheckpoint`` and ``HFExportCallback``
(async writes, also every 2 steps).  Checks: one export per checkpoint and per trigger step,
each verifies against its manifest, and the final export, loaded in ``transformers`` on the
GPU, gives the trained Megatron model's logits (float32, max abs diff <= 5e-3, TF32 allowed).

NeMo 2's ``MegatronStrategy`` is not used here: NeMo 2.7.3 needs megatron-core 0.15.x and TE
2.9, a second stack the device image does not have (see docs/GPU.md).
"""

from __future__ import annotations

import time

import pytest

from gpu_skip import require_gpu

pytestmark = pytest.mark.gpu

torch = require_gpu("transformer_engine.pytorch", "megatron.core", "lightning.pytorch")

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gpu_common as G  # noqa: E402

FP32_ATOL = 5e-3
STEPS = 6


class TELM(pl.LightningModule):
    """Holds the Megatron model at ``.module`` as NeMo does; learns next token = perm[token]."""

    def __init__(self, model, vocab: int):
        super().__init__()
        self.module = model
        self.vocab = vocab
        g = torch.Generator().manual_seed(3)
        self.register_buffer("perm", torch.randperm(vocab, generator=g), persistent=False)
        self.step_times: list[float] = []
        self._t = None

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        b, s = ids.shape
        pos = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
        logits = self.module(ids, pos, attention_mask=None)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), self.perm[ids].reshape(-1))

    def on_train_batch_start(self, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.step_times.append(time.perf_counter() - self._t)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit_with_export(model, arch: str, vocab: int, steps: int, tmp_path):
    """Lightning training of ``model`` (next token = perm[token]) with ``ModelCheckpoint`` every 3
    steps and ``HFExportCallback`` (float32, async writes) every 2 and at train end.  Returns
    (the LightningModule, the export callback, the checkpoint dir, fit seconds).  Also used by
    test_gpu_nemotron_h.py."""
    from nemo_export_hooks import HFExportCallback

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, vocab, (steps * 8, 32), generator=g))
    lm = TELM(model, vocab)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=3, save_top_k=-1,
                                        filename="step{step}", auto_insert_metric_name=False)
    export = HFExportCallback(arch=arch, dtype="float32", every_n_train_steps=2, at_train_end=True,
                              async_write=True, on_busy="wait", log_metrics=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt, export], default_root_dir=str(tmp_path))
    t0 = time.perf_counter()
    trainer.fit(lm, DataLoader(data, batch_size=8))
    return lm, export, ckpt_dir, time.perf_counter() - t0


@pytest.fixture(scope="module", autouse=True)
def _mcore():
    G.init_mcore_gpu()
    yield


def test_callback_lightning_te_grouped(tmp_path, request):
    from nemo_export_hooks.publish import verify_export

    spec = G.tiny_spec("qwen3_moe")
    model = G.build_te_gpt(spec, torch.float32)
    assert G.experts_type(model) == "TEGroupedMLP"
    lm, export, ckpt_dir, wall = fit_with_export(model, "qwen3_moe", spec.vocab_size, STEPS, tmp_path)

    exported = [e for e in export.exports]
    paths = sorted({str(e["path"]) for e in exported})
    problems = {p: verify_export(p) for p in paths}
    last = max(exported, key=lambda e: e["step"]) if exported else None
    diff = agree = float("nan")
    load_problems = {}
    if last is not None:
        model.cuda()  # Lightning's teardown moved the module back to the CPU
        ids = G.tokens(spec.vocab_size, batch=4, seq=32)
        ref = G.megatron_logits(model, ids)
        hf, info = G.load_hf_gpu(last["path"], torch.float32)
        got = G.hf_logits(hf, ids)
        diff = (got - ref).abs().max().item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        load_problems = G.loading_problems(info)
    steps = sorted(e["step"] for e in exported)
    G.record(request.node.nodeid, exports=len(exported), steps=steps, last=str(last["path"]) if last else None,
             max_abs_diff=diff, argmax_agreement=agree, loading_problems=load_problems,
             verify="ok" if not any(problems.values()) else problems, failed=export.failed,
             step_s=sorted(lm.step_times)[len(lm.step_times) // 2] if lm.step_times else float("nan"),
             wall_s=wall, checkpoints=sorted(p.name for p in ckpt_dir.iterdir()))
    assert export.failed == 0, export.failed
    # every_n_train_steps=2 -> 2, 4, 6; ModelCheckpoint every 3 -> 3, 6 (6 shared); train end: 6 (done)
    assert steps == [2, 3, 4, 6], steps
    assert not any(problems.values()), problems
    assert not load_problems, load_problems
    assert diff <= FP32_ATOL, f"max abs logit diff {diff:.3g} > {FP32_ATOL}"
