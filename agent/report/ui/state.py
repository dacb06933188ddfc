"""What the page shows, kept by a pipeline sink (output thread) and read by the HTTP threads.

The sink only stores references and bumps counters: encoding JPEGs and drawing maps happen
in the HTTP thread that asks for them, once per part, so an open page costs the inspect
path nothing and the output thread next to nothing.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from agent.report.ui import overlay
from agent.types import Inspection, Verdict

HOURS = 24          # bars in the hourly chart
RATE_WINDOW_S = 60.0


@dataclass(slots=True)
class Shot:
    """One decided part as the page shows it. The image (and map) are dropped once encoded."""
    seq: int
    part_id: str
    t_wall: float
    verdict: str
    label: str
    score: float | None
    threshold: float
    reason: str
    latency_ms: float | None
    image: np.ndarray | None = None
    defect_map: np.ndarray | None = None
    image_path: str | None = None
    has_map: bool = False
    _jpeg: bytes | None = None
    _overlay: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def meta(self) -> dict:
        return {"seq": self.seq, "part": self.part_id, "t": round(self.t_wall, 3),
                "verdict": self.verdict, "label": self.label, "score": self.score,
                "threshold": self.threshold, "reason": self.reason,
                "latency_ms": self.latency_ms, "has_image": self.image is not None
                or self._jpeg is not None, "has_map": self.has_map,
                "recorded": self.image_path}

    def jpeg(self, with_map: bool = True) -> bytes | None:
        with self._lock:
            if self._jpeg is None and self.image is not None:
                self._jpeg = overlay.jpeg(self.image)
                if self.has_map:
                    self._overlay = overlay.jpeg(overlay.draw_overlay(self.image,
                                                                      self.defect_map))
                self.image = self.defect_map = None
            return self._overlay if with_map and self._overlay is not None else self._jpeg


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def shot_of(insp: Inspection) -> Shot:
    # The pipeline fills `defect_map` ((h, w) floats) for the REJECTs of an engine with maps
    # (anomaly bundles, agent/runtime/anomaly.py); classifier engines give class scores only.
    dmap = overlay.as_map(getattr(insp, "defect_map", None))
    return Shot(insp.seq, insp.part_id, insp.t_wall, insp.verdict.value, insp.label,
                _num(insp.score), insp.threshold, insp.reason, _num(insp.latency_ms),
                insp.image, dmap, insp.image_path, dmap is not None)


class UiState:
    """The pipeline sink: the latest part, the last `rejects` non-passes, rates and bars."""

    def __init__(self, rejects: int = 24, clock=time.time):
        self._lock = threading.Lock()
        self.latest: Shot | None = None
        self.rejects: collections.deque[Shot] = collections.deque(maxlen=rejects)
        self._recent: collections.deque[float] = collections.deque()
        self.hourly: dict[int, collections.Counter] = {}
        self.maps_seen = 0
        self.clock = clock

    def __call__(self, insp: Inspection) -> None:
        shot = shot_of(insp)
        hour = int(insp.t_wall // 3600) * 3600
        with self._lock:
            self.latest = shot
            if insp.verdict is not Verdict.PASS:
                self.rejects.append(shot)
            if shot.has_map:
                self.maps_seen += 1
            self._recent.append(insp.t_wall)
            bar = self.hourly.get(hour)
            if bar is None:
                bar = self.hourly[hour] = collections.Counter()
                for old in sorted(self.hourly)[:-HOURS]:
                    del self.hourly[old]
            bar[insp.verdict.value.lower()] += 1

    def rate_per_min(self) -> float:
        now = self.clock()
        with self._lock:
            while self._recent and self._recent[0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            n = len(self._recent)
        return float(n) * 60.0 / RATE_WINDOW_S

    def bars(self) -> list[dict]:
        """The last HOURS hours, oldest first, empty hours included (a stopped line shows)."""
        now_h = int(self.clock() // 3600) * 3600
        with self._lock:
            return [{"hour": h, **{k: self.hourly.get(h, {}).get(k, 0)
                                   for k in ("pass", "reject", "failsafe")}}
                    for h in range(now_h - 3600 * (HOURS - 1), now_h + 1, 3600)]

    def reject(self, seq: int) -> Shot | None:
        with self._lock:
            for s in self.rejects:
                if s.seq == seq:
                    return s
        return None

    def snapshot(self) -> tuple[Shot | None, list[Shot]]:
        with self._lock:
            return self.latest, list(reversed(self.rejects))
