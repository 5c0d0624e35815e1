"""Shared pieces of the benchmarks: model builders, RSS peaks, the dd-like baseline, the
machine-load probe, the results table and a dependency-free PNG plot.

Imported by ``bench/throughput.py``, ``bench/stall.py`` and ``bench/run_all.py``; none of it
is used by the exporter.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import threading
import time
import zlib
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


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- a dependency-free PNG line plot -----------------------------------------------------------
# 5x7 glyphs (rows top to bottom, 5 bits each, MSB left); lowercase is drawn as uppercase.
_FONT = {
    " ": [0, 0, 0, 0, 0, 0, 0],
    "0": [14, 17, 19, 21, 25, 17, 14], "1": [4, 12, 4, 4, 4, 4, 14], "2": [14, 17, 1, 2, 4, 8, 31],
    "3": [30, 1, 1, 14, 1, 1, 30], "4": [2, 6, 10, 18, 31, 2, 2], "5": [31, 16, 30, 1, 1, 17, 14],
    "6": [6, 8, 16, 30, 17, 17, 14], "7": [31, 1, 2, 4, 8, 8, 8], "8": [14, 17, 17, 14, 17, 17, 14],
    "9": [14, 17, 17, 15, 1, 2, 12],
    "A": [14, 17, 17, 31, 17, 17, 17], "B": [30, 17, 17, 30, 17, 17, 30], "C": [14, 17, 16, 16, 16, 17, 14],
    "D": [28, 18, 17, 17, 17, 18, 28], "E": [31, 16, 16, 30, 16, 16, 31], "F": [31, 16, 16, 30, 16, 16, 16],
    "G": [14, 17, 16, 23, 17, 17, 15], "H": [17, 17, 17, 31, 17, 17, 17], "I": [14, 4, 4, 4, 4, 4, 14],
    "J": [7, 2, 2, 2, 2, 18, 12], "K": [17, 18, 20, 24, 20, 18, 17], "L": [16, 16, 16, 16, 16, 16, 31],
    "M": [17, 27, 21, 21, 17, 17, 17], "N": [17, 17, 25, 21, 19, 17, 17], "O": [14, 17, 17, 17, 17, 17, 14],
    "P": [30, 17, 17, 30, 16, 16, 16], "Q": [14, 17, 17, 17, 21, 18, 13], "R": [30, 17, 17, 30, 20, 18, 17],
    "S": [15, 16, 16, 14, 1, 1, 30], "T": [31, 4, 4, 4, 4, 4, 4], "U": [17, 17, 17, 17, 17, 17, 14],
    "V": [17, 17, 17, 17, 17, 10, 4], "W": [17, 17, 17, 21, 21, 21, 10], "X": [17, 17, 10, 4, 10, 17, 17],
    "Y": [17, 17, 10, 4, 4, 4, 4], "Z": [31, 1, 2, 4, 8, 16, 31],
    ".": [0, 0, 0, 0, 0, 12, 12], ",": [0, 0, 0, 0, 12, 4, 8], "/": [1, 1, 2, 4, 8, 16, 16],
    "(": [2, 4, 8, 8, 8, 4, 2], ")": [8, 4, 2, 2, 2, 4, 8], "-": [0, 0, 0, 31, 0, 0, 0],
    ":": [0, 12, 12, 0, 12, 12, 0], "=": [0, 0, 31, 0, 31, 0, 0], "%": [24, 25, 2, 4, 8, 19, 3],
    "+": [0, 4, 4, 31, 4, 4, 0], "_": [0, 0, 0, 0, 0, 0, 31], "[": [14, 8, 8, 8, 8, 8, 14],
    "]": [14, 2, 2, 2, 2, 2, 14], "<": [2, 4, 8, 16, 8, 4, 2], ">": [8, 4, 2, 1, 2, 4, 8],
    "*": [0, 4, 21, 14, 21, 4, 0], "'": [4, 4, 8, 0, 0, 0, 0],
}


class Canvas:
    def __init__(self, w: int, h: int):
        import numpy as np

        self.np = np
        self.w, self.h = w, h
        self.px = np.full((h, w, 3), 255, dtype=np.uint8)

    def dot(self, x: int, y: int, c, r: int = 0) -> None:
        x0, x1 = max(0, x - r), min(self.w, x + r + 1)
        y0, y1 = max(0, y - r), min(self.h, y + r + 1)
        if x0 < x1 and y0 < y1:
            self.px[y0:y1, x0:x1] = c

    def line(self, x0, y0, x1, y1, c, r: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(n + 1):
            t = i / n
            self.dot(int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t)), c, r)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), scale: int = 1) -> None:
        for ch in s:
            glyph = _FONT.get(ch.upper(), _FONT[" "])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (1 << (4 - col)):
                        xx, yy = x + col * scale, y + row * scale
                        self.px[max(0, yy) : yy + scale, max(0, xx) : xx + scale] = c
            x += 6 * scale

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + self.px[y].tobytes() for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        Path(path).write_bytes(png)


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, n: int = 5):
    import math

    span = max(hi - lo, 1e-9)
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9:
        if v >= lo - 1e-9:
            ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def draw_panel(cv: Canvas, box, title: str, xlabel: str, ylabel: str, series: list[tuple[str, list]]) -> None:
    """One line chart in ``box`` = (x, y, w, h); ``series`` = [(label, [(x, y), ...]), ...]."""
    bx, by, bw, bh = box
    left, right, top, bottom = bx + 60, bx + bw - 10, by + 30, by + bh - 45
    pts = [p for _, s in series for p in s if p[1] == p[1]]
    if not pts:
        return
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.05
    y0, y1 = 0.0, max(ys) * 1.15 or 1.0

    def X(v):
        return int(left + (v - x0) / (x1 - x0) * (right - left))

    def Y(v):
        return int(bottom - (v - y0) / (y1 - y0) * (bottom - top))

    cv.text(bx + 60, by + 8, title, scale=2)
    cv.line(left, bottom, right, bottom, (0, 0, 0))
    cv.line(left, top, left, bottom, (0, 0, 0))
    for t in _nice_ticks(y0, y1):
        cv.line(left - 4, Y(t), left, Y(t), (0, 0, 0))
        cv.line(left + 1, Y(t), right, Y(t), (230, 230, 230))
        s = _fmt(t)
        cv.text(left - 8 - 6 * len(s), Y(t) - 3, s)
    for t in _nice_ticks(x0, x1):
        cv.line(X(t), bottom, X(t), bottom + 4, (0, 0, 0))
        s = _fmt(t)
        cv.text(X(t) - 3 * len(s), bottom + 8, s)
    cv.text((left + right) // 2 - 3 * len(xlabel), bottom + 24, xlabel)
    for i, ch in enumerate(ylabel[:20]):  # vertical label
        cv.text(bx + 4, top + 10 + i * 9, ch)
    ly = top + 4
    for i, (label, s) in enumerate(series):
        c = _COLORS[i % len(_COLORS)]
        s = sorted(p for p in s if p[1] == p[1])
        for (a, b), (cc, d) in zip(s, s[1:]):
            cv.line(X(a), Y(b), X(cc), Y(d), c, r=1)
        for a, b in s:
            cv.dot(X(a), Y(b), c, r=3)
        cv.line(left + 12, ly + 3, left + 30, ly + 3, c, r=1)
        cv.text(left + 36, ly, label)
        ly += 12


def plot(path: Path, panels: list[dict], width: int = 1200, height: int = 480) -> str:
    """Write a PNG with one panel per dict (title, xlabel, ylabel, series); matplotlib is used
    when installed, else the built-in renderer.  Returns which one drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        cv = Canvas(width, height)
        w = width // len(panels)
        for i, p in enumerate(panels):
            draw_panel(cv, (i * w, 0, w, height), p["title"], p["xlabel"], p["ylabel"], p["series"])
        cv.save(path)
        return "built-in PNG writer (matplotlib is not installed)"
    fig, axes = plt.subplots(1, len(panels), figsize=(width / 100, height / 100))
    for ax, p in zip(list(axes) if len(panels) > 1 else [axes], panels):
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
    return "matplotlib"
