"""Requests as futures: every long call becomes a job with a request id; one worker thread runs the jobs.

Ordering: the jobs of one model run in its seq_id order (the SDK numbers a training client's requests 1, 2,
... and may send them concurrently, or split one forward_backward into several requests), so gradients and
optimizer steps pair up as the client issued them. Order is strict: a seq_id that never arrives (a client
that gave up on a request) holds the model's queue for `gap_timeout_s` (long enough for any upload), after
which the later ones run; a request that arrives after its place in the order has passed is refused as a
user error, never applied out of order (a forward_backward after the optim_step it belonged to).
Retries: a request whose (scope, seq_id) was seen before gets the first one's request id: it is answered
once and never applied twice.
Results: kept in memory and in the store (a client may poll after a restart), as (status, content type, body).
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .service import UserError

KEEP_IN_MEMORY = 2_000  # finished results held in memory for polls (all of them are in the store)
RESULTS_KEPT_S = 24 * 3600  # finished results kept in the store this long


@dataclass
class Job:
    request_id: str
    fn: Callable[[], tuple[str, bytes]]  # -> (content type, body)
    scope: str | None
    seq: int | None
    submitted: float


def _late(scope: str, seq: int, nxt: int) -> Callable[[], tuple[str, bytes]]:
    def refuse():
        raise UserError(f"{scope}: seq_id {seq} arrived after the requests up to seq_id {nxt - 1} had run (it was "
                        "waited for, then skipped); requests of a model are applied in order or not at all")
    return refuse


class Jobs:
    def __init__(self, store, gap_timeout_s: float = 300.0, log=print):
        self.store = store
        self.gap_timeout_s = gap_timeout_s
        self.log = log
        self.cv = threading.Condition()
        self.ordered: dict[str, dict[int, Job]] = {}  # scope -> seq -> job
        self.next_seq: dict[str, int] = {}
        self.free: deque[Job] = deque()  # jobs with no order (sampling)
        self.by_key: dict[tuple[str, int], str] = {}
        self.results: dict[str, tuple[str, str, bytes]] = {}  # request_id -> (status, content type, body)
        self.known: set[str] = set()
        self.stopping = False
        self.done = 0
        self.worker = threading.Thread(target=self._run, name="vlrl-serve-worker", daemon=True)
        self.worker.start()

    def submit(self, fn: Callable[[], tuple[str, bytes]], scope: str | None = None, seq: int | None = None,
               ordered: bool = True) -> str:
        """A job's request id. (scope, seq): answered once per pair; ordered: run in seq order within scope."""
        with self.cv:
            if scope is not None and seq is not None:
                rid = self.by_key.get((scope, seq))
                if rid is not None:  # a retry: the same future, applied once
                    return rid
            rid = f"req-{uuid.uuid4().hex}"
            job = Job(rid, fn, scope, seq, time.monotonic())
            self.known.add(rid)
            if scope is not None and seq is not None:
                self.by_key[(scope, seq)] = rid
            if scope is not None and seq is not None and ordered:
                nxt = self.next_seq.setdefault(scope, 1)
                if seq < nxt:  # its place in the order has passed: refused, never run out of order
                    job.fn = _late(scope, seq, nxt)
                    self.free.append(job)
                else:
                    self.ordered.setdefault(scope, {})[seq] = job
            else:
                self.free.append(job)
            self.cv.notify_all()
        return rid

    def start_scope(self, scope: str, next_seq: int) -> None:
        """A model created by a request outside its own sequence (load_weights for a session) starts here."""
        with self.cv:
            self.next_seq[scope] = max(self.next_seq.get(scope, 1), next_seq)
            self.cv.notify_all()

    def _pick(self) -> Job | None:
        now = time.monotonic()
        for scope, jobs in self.ordered.items():
            nxt = self.next_seq.get(scope, 1)
            if nxt in jobs:
                self.next_seq[scope] = nxt + 1
                return jobs.pop(nxt)
        if self.free:
            return self.free.popleft()
        for scope, jobs in self.ordered.items():  # a gap in a model's seq_ids: wait, then skip it
            if jobs:
                first = min(jobs)
                if now - jobs[first].submitted > self.gap_timeout_s:
                    self.log(f"model {scope}: seq_id {self.next_seq.get(scope, 1)} never arrived after "
                             f"{self.gap_timeout_s:.0f} s; running seq_id {first}")
                    self.next_seq[scope] = first + 1
                    return jobs.pop(first)
        return None

    def _run(self) -> None:
        while True:
            with self.cv:
                job = self._pick()
                while job is None and not self.stopping:
                    self.cv.wait(timeout=1.0)
                    job = self._pick()
                if self.stopping:
                    return
            try:
                ctype, body = job.fn()
                result = ("ok", ctype, body)
            except UserError as e:
                result = ("user_error", "text/plain", str(e).encode())
            except Exception as e:  # the server's fault: logged, answered, and the server keeps serving
                self.log(f"request {job.request_id} failed:\n{traceback.format_exc()}")
                result = ("server_error", "text/plain", f"{type(e).__name__}: {e}".encode())
            self.store.put_result(job.request_id, *result)
            with self.cv:
                self.results[job.request_id] = result
                while len(self.results) > KEEP_IN_MEMORY:  # older results are still in the store
                    self.results.pop(next(iter(self.results)))
                self.cv.notify_all()
            self.done += 1
            if self.done % 500 == 0:
                self.store.forget_results(older_than_s=RESULTS_KEPT_S)

    def wait(self, request_id: str, timeout_s: float) -> tuple[str, str, bytes] | None:
        """The result, or None if still running after timeout_s. KeyError for an id never issued."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while True:
                if request_id in self.results:
                    return self.results[request_id]
                if request_id not in self.known or self._finished_earlier(request_id):
                    stored = self.store.get_result(request_id)  # finished before a restart
                    if stored is None:
                        raise KeyError(request_id)
                    return stored
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(timeout=left)

    def _finished_earlier(self, request_id: str) -> bool:
        """Issued by this process, finished, and since dropped from memory: the store has it."""
        return not any(j.request_id == request_id for j in self.free) and \
            not any(j.request_id == request_id for jobs in self.ordered.values() for j in jobs.values()) and \
            self.store.get_result(request_id) is not None

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
