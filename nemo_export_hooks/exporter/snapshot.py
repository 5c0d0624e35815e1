"""The async export's host copy: this rank's converted tensors in one reused host buffer.

Why a pool: the training thread waits for this copy, so it must run at the speed of the
device->host link.  Fresh host memory at every export costs page faults (and, for pageable
memory, a CUDA staging copy at a fraction of the link's speed), so one buffer of exactly
this rank's bytes (the plan knows every name, dtype and shape: ``execute.describe``) is
allocated once, page-locked with ``cudaHostRegister`` when the weights are on a GPU (not
``pin_memory``: its caching allocator rounds a 16 GB request up to 32 GB), and reused by
every later export of the same layout.  Host memory: the rank's share plus 64 bytes of
alignment per tensor.

The copy: every tensor is converted on its device by ``run_jobs`` (cast, split, quantized
packing) and copied with one non-blocking ``copy_`` into its view of the pool, on the
current stream.  GPU temporaries are dropped right after their copy is queued; the caching
allocator hands their memory only to later work on the same stream, so it is reused once
the copy is done, never before.  Extra GPU memory is therefore one tensor's conversion
(nothing for a rename or a gate/up half already in the export dtype: those are copied
straight from the parameter), and the CPU never runs more than ``INFLIGHT_BYTES`` of copies
ahead of the GPU.  The snapshot returns after the last copy has completed, so the training
step that follows cannot change what is being copied.  On a CPU model the same path runs
(no pinning, ``copy_`` is a memcpy): the snapshot never shares the model's storage.

A pool is reused only when no tensor refers to its buffer any more (the storage's use count,
so a snapshot dropped without :meth:`HostSnapshot.release`, e.g. after a failed export, frees
it too, and tensors a caller still holds are never overwritten); otherwise the export gets a
fresh pageable buffer of its own (slower, never wrong).  ``write_prepared`` releases the
snapshot it wrote.

Profile: both producers of host tensors, :func:`take` (async) and :class:`HostStream` (the
sync export's stream), time the calling thread with ``perf_counter`` and keep the seconds in
``.phases``: ``reserve_s`` (the pool: allocation and page-locking; ``take`` only),
``convert_s`` (inside ``run_jobs``: tensor-parallel gathers, casts, splits, quantized
packing) and ``copy_s`` (the device->host copies).  On a GPU the conversion kernels run
asynchronously, so the copy's wait also covers the kernels queued before it: ``convert_s``
is then the launch cost and ``copy_s`` the device time the thread waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

import torch

log = logging.getLogger("nemo_export_hooks")

INFLIGHT_BYTES = 256 << 20  # device->host copies queued ahead of the GPU, at most (x2)
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _uses(buf: torch.Tensor) -> Optional[int]:
    """How many tensors share ``buf``'s storage (None if this torch cannot tell)."""
    try:
        return int(torch._C._storage_Use_Count(buf.untyped_storage()._cdata))
    except Exception:  # pragma: no cover - private API
        return None


class _Pool:
    """One host buffer, page-locked when ``pinned``; unregistered when replaced."""

    def __init__(self, nbytes: int, pin: bool, touch: bool = True):
        t0 = time.perf_counter()
        self.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.pinned = False
        self.busy = False  # fallback when the use count is unknown: set by take(), cleared by release()
        t1 = time.perf_counter()
        if pin:
            self.pinned = _register(self.buf)
        t2 = time.perf_counter()
        if touch and not self.pinned:
            # Fault the pages in now (page-locking does it for a pinned pool): a pool reserved
            # at setup (``reserve_host``) must not leave the first-touch cost, seconds per GB
            # on a busy host, to the first export's training-thread wait.
            self.buf.zero_()
        # where a reservation's time goes (issue 25): the allocation, page-locking (which
        # faults in every page of the buffer), or else touching the pages
        self.seconds = {"alloc_s": t1 - t0, "pin_s": t2 - t1, "touch_s": time.perf_counter() - t2}
        self._base_uses = _uses(self.buf)

    def in_use(self) -> bool:
        if self.buf is None:
            return False
        uses = _uses(self.buf)
        if uses is None or self._base_uses is None:
            return self.busy
        return uses > self._base_uses

    def free(self) -> None:
        if self.pinned:
            _unregister(self.buf)
            self.pinned = False
        self.buf = None


def _register(buf: torch.Tensor) -> bool:
    """Page-lock ``buf`` in place (CUDA only).  Returns False (pageable copies, slower but
    correct) when it is refused."""
    try:
        rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 1))  # 1: cudaHostRegisterPortable
    except Exception as e:  # pragma: no cover - CUDA only
        log.warning("HF export: cannot page-lock the %.2f GB host snapshot buffer (%s); copies will be slower", buf.numel() / 1e9, e)
        return False
    if rc != 0:  # pragma: no cover - CUDA only
        log.warning("HF export: cudaHostRegister of the %.2f GB host snapshot buffer failed (cudaError %d); copies will be slower", buf.numel() / 1e9, rc)
        return False
    return True


def _unregister(buf: torch.Tensor) -> None:  # pragma: no cover - CUDA only
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:
        pass


_LOCK = threading.Lock()
_POOL: Optional[_Pool] = None


def reserve(nbytes: int, pin: bool) -> _Pool:
    """The process's pool for ``nbytes`` (allocated, or re-allocated when the size or the
    pinning changed); a pool still in use is left alone and a fresh one is returned."""
    global _POOL
    with _LOCK:
        p = _POOL
        if p is not None and p.in_use():
            log.info("HF export: the host snapshot buffer is still in use; allocating a fresh (pageable) one for this export")
            return _Pool(nbytes, pin=False, touch=False)  # one export's: its copy touches the pages once
        if p is not None and p.buf is not None and p.buf.numel() == max(nbytes, 1) and (p.pinned or not pin):
            return p
        if p is not None:
            p.free()
        _POOL = _Pool(nbytes, pin)
        return _POOL


class HostSnapshot(list):
    """``[(name, host tensor)]`` (views of one pool buffer); :meth:`release` hands the
    buffer back for the next export once nothing reads these tensors any more."""

    pool: Optional[_Pool] = None
    phases: Optional[dict] = None  # seconds of the calling thread: reserve_s, convert_s, copy_s

    def release(self) -> None:
        pool, self.pool = self.pool, None
        self.clear()
        if pool is not None:
            with _LOCK:
                pool.busy = False


def layout_bytes(layout) -> int:
    return sum(_aligned(_nbytes(dt, shape)) for _, dt, shape in layout)


def take(items: Iterable[tuple[str, torch.Tensor]], layout, on_cuda: bool) -> HostSnapshot:
    """Copy ``items`` (what ``run_jobs`` yields, in ``layout`` order) into the pool."""
    clock = time.perf_counter
    t_start = clock()
    pool = reserve(layout_bytes(layout), pin=on_cuda)
    with _LOCK:
        pool.busy = True
    snap = HostSnapshot()
    snap.pool = pool
    views = []
    off = 0
    for name, dt, shape in layout:
        n = _nbytes(dt, shape)
        views.append((name, pool.buf.narrow(0, off, n).view(dt).view(shape)))
        off += _aligned(n)
    phases = {"reserve_s": clock() - t_start, "convert_s": 0.0, "copy_s": 0.0}
    failure: Optional[BaseException] = None
    i = 0
    pending, prev_event = 0, None
    it = iter(items)
    try:
        while True:  # a collective generator: drained even after a failure
            t_next = clock()
            try:
                name, t = next(it)
            except StopIteration:
                break
            finally:
                phases["convert_s"] += clock() - t_next
            if failure is not None:
                del t
                continue
            t_copy = clock()
            try:
                if i >= len(views):
                    raise RuntimeError(f"the export produced {name!r} beyond the {len(views)} tensors its plan lists")
                vname, view = views[i]
                if (name, t.dtype, tuple(t.shape)) != (vname, view.dtype, tuple(view.shape)):
                    raise RuntimeError(
                        f"the export produced {name!r} {t.dtype} {list(t.shape)} where its plan lists "
                        f"{vname!r} {view.dtype} {list(view.shape)}"
                    )
                view.copy_(t, non_blocking=t.device.type == "cuda")
                i += 1
                if t.device.type == "cuda":  # bound how far the CPU runs ahead of the copies
                    pending += view.numel() * view.element_size()
                    if pending >= INFLIGHT_BYTES:
                        ev = torch.cuda.Event()
                        ev.record()
                        if prev_event is not None:
                            prev_event.synchronize()
                        prev_event, pending = ev, 0
            except BaseException as e:
                failure = e
            finally:
                del t
                view = None  # no reference to the buffer left in this frame (a traceback keeps it)
                phases["copy_s"] += clock() - t_copy
        t_sync = clock()
        if on_cuda:
            torch.cuda.synchronize()
        phases["copy_s"] += clock() - t_sync
        if failure is None and i != len(views):
            failure = RuntimeError(f"the export produced {i} tensors where its plan lists {len(views)}")
    except BaseException:
        views.clear()
        snap.release()
        raise
    if failure is not None:
        views.clear()
        snap.release()
        raise failure
    snap.extend(views)
    snap.phases = phases
    return snap


class HostStream:
    """The sync export's tensors: ``run_jobs``' results handed over on the host one at a
    time (``.to("cpu")`` for a GPU model; a CPU model's tensors pass as they are and may share
    its storage), with the calling thread's ``convert_s`` and ``copy_s`` in ``.phases``."""

    def __init__(self, items: Iterable[tuple[str, torch.Tensor]]):
        self.phases = {"convert_s": 0.0, "copy_s": 0.0}
        self._gen = self._run(iter(items))

    def __iter__(self) -> "HostStream":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(self, it):
        clock, phases = time.perf_counter, self.phases
        while True:
            t0 = clock()
            try:
                name, t = next(it)
            except StopIteration:
                return
            finally:
                phases["convert_s"] += clock() - t0
            t1 = clock()
            if t.device.type != "cpu":
                t = t.to("cpu")
            phases["copy_s"] += clock() - t1
            yield name, t
