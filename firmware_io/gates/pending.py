"""The serial gate's commands awaiting an ACK, and its recent heartbeats, by seq.

One lock guards them and the seq counter: the reader thread pops what an ACK/NAK answers,
the tick thread picks what is due for a resend (same seq: the gate de-duplicates) or has
run out of tries, ``reject()`` adds from the pipeline's thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .. import protocol as P
from ..timing import Target, retarget

RECENT_HEARTBEATS = 64


@dataclass
class Pending:
    seq: int
    verb: str               # REJ, ACC or CFG
    part: str               # the part, or CFG's key
    gate: int
    target: Target | None
    pulse_ms: int
    first_ns: int
    last_ns: int
    tries: int = 1
    value: str = ""         # CFG's value

    def line(self, now_ns: int) -> bytes:
        """The command's line again, a REJ still aimed at the same instant."""
        if self.verb == "REJ":
            return P.Reject(self.seq, self.part, self.gate, retarget(self.target, now_ns),
                            self.pulse_ms).encode()
        if self.verb == "ACC":
            return P.Accept(self.seq, self.part).encode()
        return P.Config(self.seq, self.part, self.value).encode()


class PendingCommands:
    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._hb_sent: dict[int, int] = {}      # seq -> sent ns
        self._seq = 0

    def next_seq(self) -> int:
        with self._lock:
            self._seq = self._seq % (P.SEQ_MOD - 1) + 1
            return self._seq

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, p: Pending) -> None:
        with self._lock:
            self._pending[p.seq] = p

    def discard(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)

    def heartbeat(self, seq: int, now_ns: int) -> None:
        with self._lock:
            self._hb_sent[seq] = now_ns
            if len(self._hb_sent) > RECENT_HEARTBEATS:
                self._hb_sent.pop(next(iter(self._hb_sent)))

    def answered(self, seq: int, heartbeat_too: bool = True) -> tuple[Pending | None, int | None]:
        """(the command this seq answers, or None; else the heartbeat's sent ns, or None)."""
        with self._lock:
            p = self._pending.pop(seq, None)
            hb = self._hb_sent.pop(seq, None) if p is None and heartbeat_too else None
        return p, hb

    def due(self, now_ns: int, ack_ns: int, retries: int) -> tuple[list[Pending], list[Pending]]:
        """(to resend now, out of tries and dropped): unanswered for ack_ns."""
        resend, expired = [], []
        with self._lock:
            for p in list(self._pending.values()):
                if now_ns - p.last_ns < ack_ns:
                    continue
                if p.tries <= retries:
                    p.tries += 1
                    p.last_ns = now_ns
                    resend.append(p)
                else:
                    del self._pending[p.seq]
                    expired.append(p)
        return resend, expired

    def drop_all(self) -> list[Pending]:
        """Everything, as the port is lost: no ACK can come for it now."""
        with self._lock:
            lost = list(self._pending.values())
            self._pending.clear()
            self._hb_sent.clear()
        return lost
