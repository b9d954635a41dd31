"""Worker pools for per-row work (prepare, validate), kept in one place.

forkserver, not fork: the parent may already run torch or OpenCV thread pools, and a forked child
of a threaded process can deadlock. Work is sent in bounded chunks with an ordered map, so memory
stays flat and outputs never depend on timing.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from contextlib import contextmanager
from typing import Iterable, Iterator


def mp_context():
    """forkserver where the platform has it, else spawn (never fork: see the module docstring)."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def _start_worker(initializer, initargs: tuple) -> None:
    # Ctrl-C goes to the whole process group: the parent handles it (terminates the pool); a worker
    # must not die mid-row with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)


@contextmanager
def row_workers(workers: int, initializer, initargs: tuple):
    """Yields a pool of `workers` processes, each set up by initializer(*initargs), for `ordered_map`.

    One worker: no pool at all (yields None); rows are handled in this process. The initializer always
    runs here first: a worker whose initializer raises is replaced by the pool, forever (a hang), so
    whatever it raises (a model that cannot load, say) must come out here. On an error or Ctrl-C in
    the caller the pool is terminated, not waited for.
    """
    initializer(*initargs)
    if workers <= 1:
        yield None
        return
    pool = mp_context().Pool(workers, _start_worker, (initializer, initargs))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


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
