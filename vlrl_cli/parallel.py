"""Worker pools for per-row work (prepare, validate), kept in one place.

forkserver, not fork: the parent may already run torch or OpenCV thread pools, and a forked child
of a threaded process can deadlock. Work is sent in bounded chunks with an ordered map, so memory
stays flat and outputs never depend on timing.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Iterable, Iterator


def mp_context():
    """forkserver where the platform has it, else spawn (never fork: see the module docstring)."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def worker_pool(workers: int, initializer, initargs: tuple):
    return mp_context().Pool(workers, initializer, initargs)


def chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(pool, fn, items: Iterable, chunk_size: int) -> Iterator[tuple[list, list]]:
    """(chunk, results) in input order. With a pool, the next chunk is already being worked on while
    the caller handles this one (two chunks in memory at most); without one, a plain map."""
    if pool is None:
        for chunk in chunks(items, chunk_size):
            yield chunk, [fn(x) for x in chunk]
        return
    pending = None
    for chunk in chunks(items, chunk_size):
        job = pool.map_async(fn, chunk, chunksize=max(1, chunk_size // 16))
        if pending is not None:
            yield pending[0], pending[1].get()
        pending = (chunk, job)
    if pending is not None:
        yield pending[0], pending[1].get()
