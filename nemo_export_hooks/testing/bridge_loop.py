"""A CPU stand-in for Megatron-Bridge's training loop, for testing the Bridge callback.

Megatron-Bridge imports only on Python 3.12 and trains only on CUDA, so CPU tests replay
its loop around a real tiny Megatron-Core model.  What is reproduced is what the callback
depends on (``megatron/bridge/training/train.py`` and ``checkpointing.py``, 0.6-0.7):

* the context: ``CallbackContext(state, model, user_state, optimizer)`` with
  ``state.cfg.checkpoint.{save, save_interval, async_save}``, ``state.train_state.{step,
  consumed_train_samples}``, ``state.cfg.train.train_iters``; ``model`` is the list of chunks;
* the order of one iteration: finalize finished async saves (their ``on_checkpoint_save``
  fires here, against the live model and step), ``on_train_step_start``, the optimizer step,
  ``on_train_step_end`` (``train_state.step`` not yet incremented), ``step += 1``, an
  interval save of iteration ``step``;
* a save writes ``<save>/iter_NNNNNNN/`` (here the weights as one safetensors file, the
  stand-in for ``dist_checkpointing``) at save time; the tracker
  ``latest_checkpointed_iteration.txt`` and ``on_checkpoint_save`` come in its finalize:
  at once when synchronous, ``finalize_after`` iterations later when ``async_save``;
* after the loop: the final save when the last step is not on the interval, a blocking
  finalize of every async save, then ``on_train_end``.

``unpredicted_saves`` adds saves at the top of chosen iterations, outside the interval, the
way Bridge's batch-size ramp-up save comes.  ``kill_at`` ends the run at the top of that
iteration the way a SIGKILL would: no final save, no finalize of pending async saves, no
``on_train_end`` (the test then drains the callback's writer thread).  Saving an iteration
again (a resume from an older iteration) overwrites ``iter_NNNNNNN/``'s weights in place and
leaves whatever else is in it, the worst case for an export kept inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["BridgeRun", "CheckpointConfig", "load_saved_weights"]

WEIGHTS = "model.safetensors"


@dataclass
class CheckpointConfig:
    save: Optional[str]
    save_interval: Optional[int] = None
    async_save: bool = False
    load: Optional[str] = None


@dataclass
class TrainConfig:
    train_iters: int


@dataclass
class ConfigContainer:
    checkpoint: CheckpointConfig
    train: TrainConfig
    dataset: Any = None
    tokenizer: Any = None


@dataclass
class TrainState:
    step: int = 0
    consumed_train_samples: int = 0


@dataclass
class GlobalState:
    cfg: ConfigContainer
    train_state: TrainState
    tensorboard_logger: Any = None


@dataclass
class CallbackContext:
    state: GlobalState
    model: list
    user_state: dict = field(default_factory=dict)
    optimizer: Any = None


class BridgeRun:
    """Train ``model`` (a Megatron-Core GPTModel) with Bridge's event order (module doc).

    ``live_at_finalize[N]`` records, for each checkpoint N, the iteration the live model had
    reached when its ``on_checkpoint_save`` fired (``N`` for synchronous saves)."""

    def __init__(self, model, callbacks: list, ckpt: CheckpointConfig, train_iters: int, start_step: int = 0,
                 finalize_after: int = 2, unpredicted_saves: tuple = (), batch: int = 2, seq: int = 16, seed: int = 0,
                 kill_at: Optional[int] = None):
        self.model = model
        self.callbacks = callbacks
        self.state = GlobalState(ConfigContainer(ckpt, TrainConfig(train_iters)), TrainState(step=start_step))
        self.finalize_after = finalize_after
        self.unpredicted = set(unpredicted_saves)
        self.kill_at = kill_at
        self.killed = False
        self.user_state: dict = {}
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05)
        self.pending: list[tuple[int, int]] = []  # (save iteration, finalize at iteration)
        self.live_at_finalize: dict[int, int] = {}
        g = torch.Generator().manual_seed(seed)
        vocab = model.vocab_size
        self.data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(8)]

    def _fire(self, event: str) -> None:
        ctx = CallbackContext(self.state, [self.model], self.user_state, self.opt)
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(ctx)

    def _train_step(self) -> None:
        from .cpu import apply_cpu_shims

        apply_cpu_shims()
        batch = self.data[self.state.train_state.step % len(self.data)]
        tokens, labels = batch[:, :-1], batch[:, 1:]
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
        self.model.train()
        # with labels, Megatron returns the per-token loss [batch, seq]
        loss = self.model(input_ids=tokens, position_ids=pos, attention_mask=mask, labels=labels).float().mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def _save(self, iteration: int) -> None:
        from safetensors.torch import save_file

        if _rank() == 0:  # replicas are identical (same data on every rank): rank 0 writes
            d = Path(self.state.cfg.checkpoint.save) / f"iter_{iteration:07d}"
            d.mkdir(parents=True, exist_ok=True)
            sd = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
            save_file(sd, str(d / WEIGHTS))
        if self.state.cfg.checkpoint.async_save:
            self.pending.append((iteration, iteration + self.finalize_after))
        else:
            self._finalize(iteration)

    def _finalize(self, iteration: int) -> None:
        save = Path(self.state.cfg.checkpoint.save)
        if _rank() == 0:  # Bridge's rank 0 writes the tracker before the event fires
            (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        self.live_at_finalize[iteration] = self.state.train_state.step
        self._fire("on_checkpoint_save")

    def _finalize_ready(self, blocking: bool) -> None:
        ready = [p for p in self.pending if blocking or p[1] <= self.state.train_state.step]
        for p in ready:
            self.pending.remove(p)
            self._finalize(p[0])

    def run(self) -> "BridgeRun":
        ts, ck = self.state.train_state, self.state.cfg.checkpoint
        self._fire("on_train_start")
        while ts.step < self.state.cfg.train.train_iters:
            if self.kill_at is not None and ts.step == self.kill_at:
                self.killed = True  # a SIGKILL: nothing else happens
                return self
            self._finalize_ready(blocking=False)
            if ts.step in self.unpredicted and ck.save:
                self._save(ts.step)
            self._fire("on_train_step_start")
            self._train_step()
            self._fire("on_train_step_end")
            ts.step += 1
            ts.consumed_train_samples += self.data[0].shape[0]
            if ck.save and ck.save_interval and ts.step % ck.save_interval == 0:
                self._save(ts.step)
        if ck.save and ts.step and (not ck.save_interval or ts.step % ck.save_interval != 0):
            self._save(ts.step)
        self._finalize_ready(blocking=True)
        self._fire("on_train_end")
        return self


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_saved_weights(model, save_dir: str | Path, iteration: int) -> None:
    """Load the weights the stand-in checkpoint of ``iteration`` holds into ``model``."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(save_dir) / f"iter_{iteration:07d}" / WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    if missing or unexpected:
        raise KeyError(f"checkpoint iter_{iteration:07d} does not fit the model: missing {missing}, unexpected {unexpected}")
