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

Full disk: alerts come before everything else on the box, so the outbox keeps a reserve
file (``<path>.reserve``, ``reserve_bytes`` preallocated). When SQLite reports SQLITE_FULL
the reserve is deleted and the write tried again; an alert that still cannot be stored
raises OutboxFull and is counted in ``dropped_full`` (never a silent loss). The reserve is
re-made once the disk has room for it again. ``disk_full`` says whether the outbox is
running on (or past) its reserve: the station reports itself degraded meanwhile.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("firmware_io.outbox")

# How often, while on the reserve, put() checks whether the disk has room to re-make it.
_RESERVE_RECHECK_S = 5.0


class OutboxFull(sqlite3.OperationalError):
    """The alert could not be stored: the disk (or the database's size cap) is full."""


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)

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
    def __init__(self, path: str | Path, max_rows: int = 100_000, synchronous: str = "FULL",
                 reserve_bytes: int = 0):
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
        self.dropped = 0            # oldest rows deleted past max_rows
        self.dropped_full = 0       # alerts refused because the disk was full
        self.reserve_bytes = int(reserve_bytes) if self.path != ":memory:" else 0
        self.reserve_path = self.path + ".reserve"
        self.disk_full = False
        self.last_error: str | None = None
        self._reserve_checked = 0.0
        self._make_reserve()

    # -- the disk reserve ----------------------------------------------------------------
    def _make_reserve(self) -> bool:
        """(Re)create the reserve file; False when the disk has no room for it."""
        if self.reserve_bytes <= 0:
            return True
        try:
            if os.path.getsize(self.reserve_path) >= self.reserve_bytes:
                return True
        except OSError:
            pass
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # posix_fallocate reserves real blocks (a sparse file would reserve nothing)
                os.posix_fallocate(fd, 0, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError as e:
            try:
                os.unlink(self.reserve_path)
            except OSError:
                pass
            log.warning("outbox: no room for the %d kB disk reserve %s: %s",
                        self.reserve_bytes // 1024, self.reserve_path, e.strerror or e)
            return False

    def _release_reserve(self) -> bool:
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        log.error("outbox: DISK FULL; released the %d kB reserve so alerts can still be stored",
                  self.reserve_bytes // 1024)
        return True

    def _maybe_restore_reserve(self) -> None:
        now = time.monotonic()
        if now - self._reserve_checked < _RESERVE_RECHECK_S:
            return
        self._reserve_checked = now
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            room = st.f_bavail * st.f_frsize
        except OSError:
            return
        if room >= 2 * self.reserve_bytes and self._make_reserve():
            self.disk_full = False
            log.warning("outbox: disk has room again; reserve restored")

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Commit one message; returns its id (ids grow: they give the delivery order).
        Past ``max_rows`` the oldest rows are dropped (counted in ``dropped``). Raises
        OutboxFull (counted in ``dropped_full``) when the disk cannot take it even after
        the reserve was released."""
        with self._lock:
            try:
                rid = self._insert(topic, payload, qos)
            except sqlite3.OperationalError as e:
                if not _is_full(e):
                    raise
                self.disk_full = True
                if not self._release_reserve():
                    self.dropped_full += 1
                    self.last_error = str(e)
                    raise OutboxFull(f"alert not stored: {e}") from None
                try:
                    rid = self._insert(topic, payload, qos)
                except sqlite3.OperationalError as e2:
                    if not _is_full(e2):
                        raise
                    self.dropped_full += 1
                    self.last_error = str(e2)
                    raise OutboxFull(f"alert not stored: {e2}") from None
            if self.disk_full:
                self._maybe_restore_reserve()
            return rid

    def _insert(self, topic: str, payload: bytes, qos: int) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        dropped = 0
        try:
            over = self._count + 1 - self.max_rows
            if over > 0:
                db.execute("DELETE FROM outbox WHERE id IN "
                           "(SELECT id FROM outbox ORDER BY id LIMIT ?)", (over,))
                dropped = over
            cur = db.execute("INSERT INTO outbox (topic, payload, qos, created) "
                             "VALUES (?, ?, ?, ?)", (topic, payload, qos, time.time()))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.dropped += dropped
        self._count += 1 - dropped
        return cur.lastrowid

    def _rollback(self) -> None:
        # SQLITE_FULL (and IOERR, NOMEM) may already have rolled the transaction back; a
        # second ROLLBACK would then raise "no transaction is active" and hide the cause.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as e:
                log.warning("outbox: rollback failed: %s", e)

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
                self._rollback()
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
