"""Reject timing: turn a part's capture time (or latched encoder count) into a gate target.

Time mode: the part reaches the gate ``delay_ms`` after capture. The command tells the gate
to fire ``d<ms>`` after it receives the command, where ms = delay_ms - time already spent
since capture. If that remaining lead is below ``min_lead_ms`` the command is LATE: it is
still sent, as ``d0`` (fire now: a mistimed kick beats a defect passing), and flagged.

Encoder mode: fire at encoder count ``latched + encoder_offset`` (``e<count>``). The gate
counts, so the host's latency does not matter, unless the count has already passed, which
the host can only tell when it knows the current count (``encoder_now``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

ENCODER_MOD = 2**32


@dataclass(frozen=True)
class RejectTiming:
    mode: Literal["time", "encoder"] = "time"
    delay_ms: float = 500
    encoder_offset: int = 0
    pulse_ms: int = 50
    min_lead_ms: float = 5.0

    def __post_init__(self):
        if self.mode not in ("time", "encoder"):
            raise ValueError(f"mode must be 'time' or 'encoder', not {self.mode!r}")
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        if not 1 <= int(self.pulse_ms) <= 10_000:
            raise ValueError("pulse_ms must be in 1..10000")
        if self.min_lead_ms < 0:
            raise ValueError("min_lead_ms must be >= 0")


@dataclass(frozen=True)
class Target:
    """Where/when to fire. ``at`` is the wire form (``d<ms>`` / ``e<count>``)."""
    at: str
    late: bool
    lead_ms: float          # time mode: remaining ms before the part reaches the gate
                            # (negative: already past); encoder mode: nan unless known
    fire_at_ns: int | None  # time mode: the monotonic_ns instant the gate should fire
    mode: str


def compute_target(timing: RejectTiming, t_capture_ns: int, encoder: int | None = None,
                   now_ns: int | None = None, encoder_now: int | None = None) -> Target:
    """The target for a part captured at ``t_capture_ns`` (time.monotonic_ns() clock).

    Encoder mode without a latched ``encoder`` falls back to time mode (the result's
    ``mode`` says "time"). With encoder timing configured, delay_ms is usually 0, so that
    fallback is ``d0``: the serial gate therefore refuses such a part instead of calling
    this (a blind kick hits whatever part is at the gate)."""
    if now_ns is None:
        now_ns = time.monotonic_ns()
    if timing.mode == "encoder" and encoder is not None:
        count = (int(encoder) + int(timing.encoder_offset)) % ENCODER_MOD
        late = False
        lead = float("nan")
        if encoder_now is not None:
            ahead = (count - int(encoder_now)) % ENCODER_MOD
            late = ahead == 0 or ahead >= ENCODER_MOD // 2
        return Target(at=f"e{count}", late=late, lead_ms=lead, fire_at_ns=None, mode="encoder")
    elapsed_ms = (now_ns - t_capture_ns) / 1e6
    remaining = timing.delay_ms - elapsed_ms
    fire_at_ns = t_capture_ns + int(timing.delay_ms * 1e6)
    if remaining < timing.min_lead_ms:
        return Target(at="d0", late=True, lead_ms=remaining, fire_at_ns=fire_at_ns, mode="time")
    return Target(at=f"d{int(round(remaining))}", late=False, lead_ms=remaining,
                  fire_at_ns=fire_at_ns, mode="time")


def retarget(target: Target, now_ns: int | None = None) -> str:
    """The ``at`` for a resend of a time-mode command: still aimed at the same instant."""
    if target.mode != "time" or target.fire_at_ns is None:
        return target.at
    if now_ns is None:
        now_ns = time.monotonic_ns()
    remaining = (target.fire_at_ns - now_ns) / 1e6
    return f"d{max(0, int(round(remaining)))}"


def quantile(sorted_values, q: float):
    """The nearest-rank q-quantile (0 <= q <= 1) of an already sorted sequence,
    sorted_values[min(n - 1, int(q * n))]; None when it is empty. The one quantile rule for
    latency summaries (pipeline stats, demo summary, gate RTT / fire error)."""
    n = len(sorted_values)
    return sorted_values[min(n - 1, int(q * n))] if n else None
