"""Shared pieces of the benchmarks: model builders, RSS peaks, the dd-like baseline, the
machine-load probe, the results table and the plot (matplotlib: the ``bench`` extra).

Imported by ``bench/throughput.py``, ``bench/stall.py`` and ``bench/run_all.py``; none of it
is used by the exporter.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


# -- environment ----------------------------------------------------------------------------
def quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "megatron", "nemo_export_hooks"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def foreign_cpu(seconds: float = 2.0) -> float:
    """Cores used by processes outside this process tree over ``seconds`` (other people's
    load, which the load average mixes with the benchmark's own)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return float("nan")
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    try:
        ours |= {p.pid for p in me.parents()}
    except Exception:
        pass

    def snapshot():
        out = {}
        for p in psutil.process_iter(["pid"]):
            if p.pid in ours:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return out

    a = snapshot()
    time.sleep(seconds)
    b = snapshot()
    return sum(max(0.0, b[k] - a.get(k, b[k])) for k in b) / seconds


def wait_for_quiet(limit: float = 1.5, max_wait_s: float = 0.0) -> float:
    """Wait (at most ``max_wait_s``) for the 1-minute load average to drop below ``limit``;
    return the load average when we start."""
    t0 = time.time()
    while load_average() >= limit and time.time() - t0 < max_wait_s:
        time.sleep(5)
    return load_average()


def drop_dirty() -> None:
    """Flush other dirty data first, so one measurement does not pay for the previous one."""
    os.sync()


def rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
    if p.exists() and not p.is_dir():
        p.unlink()


# -- memory -------------------------------------------------------------------------------
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise), so RSS baselines are honest."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class PeakRSS:
    """Peak resident set size while the block runs, and its excess over the RSS at entry.

    Uses the kernel's high-water mark (``/proc/self/clear_refs`` reset + ``VmHWM``) where
    available, else samples RSS every 2 ms (psutil)."""

    def __init__(self):
        self.base = 0
        self.peak = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakRSS":
        trim_heap()
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = _status_kb("VmHWM") is not None
        except OSError:
            self._hwm = False
        self.peak = self.base
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self._hwm:
            self.peak = max(self.peak, (_status_kb("VmHWM") or 0) * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


# -- models -------------------------------------------------------------------------------
def moe_spec(layers: int, experts: int = 64, hidden: int = 1024, moe_ffn: int = 512, vocab: int = 32768):
    """A Qwen3-MoE-shaped spec: ~``layers`` x (experts x 3 x hidden x moe_ffn) + 2 x vocab x hidden."""
    from nemo_export_hooks.testing.cpu import TinySpec

    return TinySpec(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=16,
        num_query_groups=4,
        kv_channels=hidden // 16,
        ffn_hidden_size=4 * hidden,
        vocab_size=vocab,
        max_seq_len=128,
        num_experts=experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=4,
    )


def fill_random(model, seed: int = 0) -> None:
    """Give every parameter random values fast: one random block, tiled (Megatron's own CPU
    initialisation of a 1B-parameter model takes minutes on 2 cores)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 22, generator=g) * 0.02).to(torch.float32)
    with torch.no_grad():
        for p in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            flat = p.view(-1)
            n = flat.numel()
            src = block.to(p.dtype)
            for s in range(0, n, src.numel()):
                k = min(src.numel(), n - s)
                flat[s : s + k].copy_(src[:k])
            if p.dim() == 1:  # norms: around 1, distinct
                flat.add_(1.0)


def build_model(layers: int, dtype: str = "bfloat16", experts: int = 64, seed: int = 0):
    """A real Megatron-Core GPTModel (local spec, SequentialMLP experts) on CPU, parameters in
    ``dtype``; Megatron's parallel state must be initialised (``init_single_process``)."""
    import torch

    from nemo_export_hooks.testing.cpu import build_gpt

    m = build_gpt(moe_spec(layers, experts=experts), params_dtype=getattr(torch, dtype), perform_initialization=False)
    fill_random(m, seed)
    return m


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


# -- the physical limit ---------------------------------------------------------------------
_DD_BUF: Optional[bytearray] = None


def dd_write(path: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Write ``nbytes`` sequentially (``block``-byte writes from one buffer, like
    ``dd bs=64M conv=fsync``) and fsync; return the seconds.  The file is removed after."""
    global _DD_BUF
    if _DD_BUF is None or len(_DD_BUF) != block:
        _DD_BUF = bytearray(os.urandom(1 << 20) * (block >> 20))
    view = memoryview(_DD_BUF)
    drop_dirty()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, block)])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    drop_dirty()
    return dt


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


CALLER_PHASES = ("plan_s", "reserve_s", "convert_s", "copy_s", "write_s", "commit_s")
WRITER_PHASES = ("pwrite_s", "hash_s", "fsync_s", "rename_s")  # = exporter.writer.WRITER_PHASES


def median_phases(runs: list) -> dict:
    """Per-key median of several ``ExportResult.phases`` dicts."""
    keys = [k for k in runs[0]] if runs else []
    return {k: median([r.get(k, 0.0) for r in runs]) for k in keys}


def profile_line(phases: dict, seconds: Optional[float] = None) -> str:
    """``ExportResult.phases`` as one line: the calling thread's phases (they add up to at most
    the export's seconds) and, apart, the writer threads' mean busy seconds (they run beside
    the conversion, so they are a breakdown of the write, not more terms of the sum)."""
    own = [(k, phases[k]) for k in CALLER_PHASES if k in phases]
    line = " + ".join(f"{k[:-2]} {v:.2f}" for k, v in own) + f" = {sum(v for _, v in own):.2f} s"
    if seconds is not None:
        line += f" of {seconds:.2f} s"
    wr = [(k, phases[k]) for k in WRITER_PHASES if k in phases]
    if wr:
        line += "; per writer thread (mean busy, beside the above): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in wr) + " s"
    return line


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- the plot ---------------------------------------------------------------------------------
def plot(path: Path, panels: list[dict], width: int = 1200, height: int = 480) -> str:
    """Write a PNG with one line chart per dict (title, xlabel, ylabel, series =
    [(label, [(x, y), ...]), ...]; NaN points are left out).  Returns what drew it."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        from nemo_export_hooks.extras import missing_extra

        raise missing_extra("bench", "the bench plot", e) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(width / 100, height / 100), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, s in p["series"]:
            s = sorted(q for q in s if q[1] == q[1])
            ax.plot([q[0] for q in s], [q[1] for q in s], marker="o", label=label)
        ax.set_title(p["title"])
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"matplotlib {matplotlib.__version__}"
