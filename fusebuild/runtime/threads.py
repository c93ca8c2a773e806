"""Large CPU calls split over threads: kernels take an element range and ctypes releases the GIL
while they run, so one call can use every core; small calls run inline."""
from __future__ import annotations

import ctypes
import os
import threading
from typing import TYPE_CHECKING

from ..errors import BundleError

if TYPE_CHECKING:       # imported by the first call split over threads (logging: ~5 ms)
    from concurrent.futures import ThreadPoolExecutor

MIN_PER_THREAD = 1 << 16      # elements; below this a thread costs more than it saves
_ALIGN = 64                   # split points at multiples of 64 elements (whole cache lines)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def configured_threads() -> int:
    """FUSEBUILD_NUM_THREADS, else the cores this process may run on."""
    value = os.environ.get("FUSEBUILD_NUM_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BundleError(f"FUSEBUILD_NUM_THREADS={value!r} is not a positive integer")
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _executor(threads: int) -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="fusebuild")
        return _pool


def ranges(n: int, threads: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering [0, n) for up to `threads` threads."""
    t = max(1, min(threads, n // MIN_PER_THREAD))
    step = -(-n // t)
    step = -(-step // _ALIGN) * _ALIGN
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def run(fn, ptrs, meta, n: int, threads: int) -> None:
    """Call kernel `fn(ptrs, meta, start, stop)` over [0, n), split over up to `threads`
    threads (`fn` takes ctypes values, see runtime.cpu.Libraries)."""
    parts = [(ctypes.c_int64(a), ctypes.c_int64(b)) for a, b in ranges(n, threads)]
    pool = _executor(threads) if len(parts) > 1 else None
    futures = [pool.submit(fn, ptrs, meta, a, b) for a, b in parts[1:]]
    fn(ptrs, meta, *parts[0])
    for f in futures:
        f.result()
