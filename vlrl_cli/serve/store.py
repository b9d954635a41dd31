"""What outlives a `vlrl serve` process, in SQLite under --state: sessions, models, checkpoints and their
tinker:// paths, and finished requests' results (a client may still be polling for them after a restart).

One connection shared by the HTTP threads and the job worker, behind a lock (sqlite3's own rule)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, created REAL, finished REAL);
CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, lora_rank INTEGER,
                                   created REAL);
CREATE TABLE IF NOT EXISTS checkpoints (path TEXT PRIMARY KEY, model_id TEXT, kind TEXT, dir TEXT, meta TEXT,
                                        created REAL);
CREATE TABLE IF NOT EXISTS samplers (sampler_id TEXT PRIMARY KEY, session_id TEXT, base_model TEXT, model_path TEXT);
CREATE TABLE IF NOT EXISTS results (request_id TEXT PRIMARY KEY, status TEXT, content_type TEXT, body BLOB,
                                    created REAL);
"""


class Store:
    def __init__(self, path: Path):
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def _one(self, sql: str, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def _do(self, sql: str, args=()) -> None:
        with self.lock:
            self.db.execute(sql, args)

    def put_session(self, session_id: str) -> None:
        self._do("INSERT OR IGNORE INTO sessions VALUES (?, ?, NULL)", (session_id, time.time()))

    def has_session(self, session_id: str) -> bool:
        return self._one("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)) is not None

    def finish_session(self, session_id: str) -> bool:
        if self._one("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)) is None:
            return False
        self._do("UPDATE sessions SET finished = ? WHERE session_id = ?", (time.time(), session_id))
        return True

    def put_model(self, model_id: str, session_id: str, base_model: str, lora_rank: int) -> None:
        self._do("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                 (model_id, session_id, base_model, lora_rank, time.time()))

    def get_model(self, model_id: str) -> dict | None:
        row = self._one("SELECT model_id, session_id, base_model, lora_rank, created FROM models WHERE model_id = ?",
                        (model_id,))
        return dict(zip(("model_id", "session_id", "base_model", "lora_rank", "created"), row)) if row else None

    def put_checkpoint(self, path: str, model_id: str, kind: str, directory: str, meta: dict) -> None:
        self._do("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                 (path, model_id, kind, directory, json.dumps(meta), time.time()))

    def get_checkpoint(self, path: str) -> dict | None:
        row = self._one("SELECT path, model_id, kind, dir, meta, created FROM checkpoints WHERE path = ?", (path,))
        if row is None:
            return None
        return {"path": row[0], "model_id": row[1], "kind": row[2], "dir": row[3], "meta": json.loads(row[4]),
                "created": row[5]}

    def checkpoints(self, model_id: str) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT path FROM checkpoints WHERE model_id = ? ORDER BY created",
                                   (model_id,)).fetchall()
        return [self.get_checkpoint(r[0]) for r in rows]

    def put_sampler(self, sampler_id: str, session_id: str, base_model: str | None, model_path: str | None) -> None:
        self._do("INSERT OR REPLACE INTO samplers VALUES (?, ?, ?, ?)", (sampler_id, session_id, base_model, model_path))

    def get_sampler(self, sampler_id: str) -> dict | None:
        row = self._one("SELECT sampler_id, session_id, base_model, model_path FROM samplers WHERE sampler_id = ?",
                        (sampler_id,))
        return dict(zip(("sampler_id", "session_id", "base_model", "model_path"), row)) if row else None

    def put_result(self, request_id: str, status: str, content_type: str, body: bytes) -> None:
        self._do("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                 (request_id, status, content_type, body, time.time()))

    def get_result(self, request_id: str) -> tuple[str, str, bytes] | None:
        row = self._one("SELECT status, content_type, body FROM results WHERE request_id = ?", (request_id,))
        return (row[0], row[1], bytes(row[2])) if row else None

    def forget_results(self, older_than_s: float = 3600.0) -> None:
        self._do("DELETE FROM results WHERE created < ?", (time.time() - older_than_s,))
