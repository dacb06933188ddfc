"""A durable, ordered, size-capped outbox for alerts (SQLite in WAL mode).

An alert is committed here BEFORE it is handed to MQTT and deleted only when the broker's
PUBACK arrives, so a broker outage, a crash or ``kill -9`` loses nothing that ``put()``
returned for: delivery is at-least-once (a message whose PUBACK was lost is sent again).

Durability choice: ``synchronous=FULL`` by default. In WAL mode a commit is written to the
WAL file before ``put()`` returns; that alone survives a killed process (the data is in the
OS page cache, which the kernel writes out), so NORMAL would already pass a SIGKILL test.
FULL adds an fsync of the WAL per commit, which also survives a power cut or kernel panic,
the failure an edge box on a factory floor actually sees. Reject alerts come at most tens per
second; the fsync cost (see benchmarks/fw_bench.py) is affordable. ``synchronous="NORMAL"``
is available where the disk is slow and power is protected.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL DEFAULT 1,
    created REAL    NOT NULL
)
"""


class Outbox:
    def __init__(self, path: str | Path, max_rows: int = 100_000, synchronous: str = "FULL"):
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = int(max_rows)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute(_SCHEMA)
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.dropped = 0

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Commit one message; returns its id (ids grow: they give the delivery order).
        Past ``max_rows`` the oldest rows are dropped (counted in ``dropped``)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                over = self._count + 1 - self.max_rows
                if over > 0:
                    db.execute("DELETE FROM outbox WHERE id IN "
                               "(SELECT id FROM outbox ORDER BY id LIMIT ?)", (over,))
                    self.dropped += over
                    self._count -= over
                cur = db.execute("INSERT INTO outbox (topic, payload, qos, created) "
                                 "VALUES (?, ?, ?, ?)", (topic, payload, qos, time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count += 1
            return cur.lastrowid

    def after(self, last_id: int, limit: int) -> list[tuple[int, str, bytes, int]]:
        """Rows with id > last_id in order: (id, topic, payload, qos)."""
        with self._lock:
            return self._db.execute(
                "SELECT id, topic, payload, qos FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit)).fetchall()

    def delete(self, ids) -> int:
        ids = list(ids)
        if not ids:
            return 0
        n = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    cur = self._db.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                    n += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= n
        return n

    def depth(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
