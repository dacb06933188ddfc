"""The pipeline's numbers: counted as parts go by, read as one PipelineStats snapshot.

    stats = StatsCollector()            # the pipeline's; any thread may count into it
    stats.part(insp)                    # once per part, right after its gate action
    snap = stats.snapshot(mode=..., ...)  # PipelineStats: typed, immutable
    snap.as_dict()                      # Pipeline.stats(): the MQTT metrics JSON's core

The status line, the MQTT metrics and Prometheus's periodic gauges (PromMetrics.update(
stats=snap)) all read the same snapshot, so they cannot disagree about what happened.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from firmware_io.timing import quantile

from agent.types import Inspection, Verdict

# the per-part timings (Inspection.timings_ms keys; Prometheus stage label values)
STAGES = ("decode", "preprocess", "queue", "invoke", "decide", "gate", "total")


@dataclass(frozen=True)
class Quantiles:
    p50: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class PipelineStats:
    mode: str                    # the trigger mode: frame, external, presence
    frames: int                  # frames captured
    parts: int                   # parts decided (each exactly once)
    passed: int
    rejected: int
    failsafe: int
    failsafe_reasons: dict[str, int]
    reports_dropped: int         # records the output stage could not take
    images_dropped: int          # reports sent without their image (output thread behind)
    gate_errors: int             # reject commands the gate could not take at once
    rate: float                  # parts/s reported, over the last 256 reports
    latency_ms: Quantiles        # capture (or trigger) -> gate command
    invoke_ms: Quantiles
    queues: dict[str, int]
    source: str                  # agent.runtime.capture.SourceState value
    source_reason: str
    paused: bool
    selector: dict[str, int] = field(default_factory=dict)   # the trigger mode's counters

    def as_dict(self) -> dict:
        """The wire form (Pipeline.stats(), the metrics JSON): keys and order unchanged."""
        return {
            "mode": self.mode,
            "frames": self.frames,
            "selector": dict(self.selector),
            "parts": self.parts,
            "pass": self.passed, "reject": self.rejected,
            "failsafe": self.failsafe,
            "failsafe_reasons": dict(self.failsafe_reasons),
            "reports_dropped": self.reports_dropped,
            "images_dropped": self.images_dropped,
            "gate_errors": self.gate_errors,
            "rate": self.rate,
            "latency_ms": {"p50": self.latency_ms.p50, "p99": self.latency_ms.p99,
                           "max": self.latency_ms.max},
            "invoke_ms": {"p50": self.invoke_ms.p50, "p99": self.invoke_ms.p99},
            "queues": dict(self.queues),
            "source": self.source,
            "paused": self.paused,
        }


class StatsCollector:
    """Live counters. `counts` and `failsafes` are Counters keyed by plain strings
    (verdict values, "frames", "parts", ...; FailsafeReason values)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.failsafes: collections.Counter = collections.Counter()
        self.latency_ms: collections.deque = collections.deque(maxlen=2048)
        self.invoke_ms: collections.deque = collections.deque(maxlen=2048)
        self._rate_marks: collections.deque = collections.deque(maxlen=256)
        self._reported = 0

    def frame(self) -> None:
        with self._lock:
            self.counts["frames"] += 1

    def invoke(self, ms: float) -> None:
        self.invoke_ms.append(ms)

    def part(self, insp: Inspection, *, gate_failed: bool, image_dropped: bool) -> None:
        with self._lock:
            c = self.counts
            c["parts"] += 1
            c[insp.verdict.value] += 1
            if insp.failsafe_reason is not None:
                self.failsafes[insp.failsafe_reason.value] += 1
            if gate_failed:
                c["gate_errors"] += 1
            self.latency_ms.append(insp.timings_ms["total"])
            if image_dropped:
                c["images_dropped"] += 1

    def report_dropped(self) -> None:
        with self._lock:
            self.counts["reports_dropped"] += 1

    def reported(self) -> None:
        """A record went through every sink (output thread): the rate counts these."""
        self._reported += 1
        self._rate_marks.append((time.monotonic(), self._reported))

    def rate(self) -> float:
        marks = list(self._rate_marks)
        if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
            return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        return 0.0

    def snapshot(self, *, mode: str, queues: dict[str, int], source: str,
                 source_reason: str, paused: bool,
                 selector: dict[str, int] | None = None) -> PipelineStats:
        lat = sorted(self.latency_ms)
        inv = sorted(self.invoke_ms)
        with self._lock:
            c = dict(self.counts)
            fs = dict(self.failsafes)
        return PipelineStats(
            mode=mode, frames=c.get("frames", 0), parts=c.get("parts", 0),
            passed=c.get(Verdict.PASS.value, 0), rejected=c.get(Verdict.REJECT.value, 0),
            failsafe=c.get(Verdict.FAILSAFE.value, 0), failsafe_reasons=fs,
            reports_dropped=c.get("reports_dropped", 0),
            images_dropped=c.get("images_dropped", 0), gate_errors=c.get("gate_errors", 0),
            rate=round(self.rate(), 2),
            latency_ms=Quantiles(_q(lat, 0.5), _q(lat, 0.99), lat[-1] if lat else None),
            invoke_ms=Quantiles(_q(inv, 0.5), _q(inv, 0.99)),
            queues=queues, source=source, source_reason=source_reason, paused=paused,
            selector=selector or {})


def _q(s: list[float], p: float) -> float | None:
    v = quantile(s, p)
    return None if v is None else round(v, 3)


__all__ = ["PipelineStats", "Quantiles", "StatsCollector", "STAGES"]
