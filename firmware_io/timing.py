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
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ENCODER_MOD = 2**32


def whole_ms(example: float) -> AfterValidator:
    """Refuse under 1 ms: never a real deadline or travel time, it is seconds typed into a
    millisecond field, and it would make every part late (or FAILSAFE)."""
    def check(v: Optional[float]) -> Optional[float]:
        if v is not None and v < 1:
            raise ValueError(f"{v:g} ms is under 1 ms; the value is in milliseconds "
                             f"(e.g. {example:g} for {example / 1000:g} s)")
        return v
    return AfterValidator(check)


# The rules for the durations a plant engineer types, each in one place: the gate's travel
# delay (config) and the pulse a gate holds its output (config, wire protocol, MQTT gate).
TravelMs = Annotated[float, Field(gt=0, le=600_000), whole_ms(800)]
PulseMs = Annotated[int, Field(ge=1, le=10_000)]


class RejectTiming(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["time", "encoder"] = "time"
    delay_ms: float = Field(500, ge=0)
    encoder_offset: int = 0
    pulse_ms: PulseMs = 50
    min_lead_ms: float = Field(5.0, ge=0)


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
