"""Mode "presence": parts found and tracked on a free-running camera, one decision each.

Time is the capture clock (time.monotonic_ns): crossings are timed on it, so a wall-clock
step (NTP) moves nothing here.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import cv2
import numpy as np

from agent.runtime.selector import Part, SelectorBase
from agent.runtime.sources import Captured
from agent.types import Box, FailsafeReason

PART_NOT_JUDGED = FailsafeReason.PART_NOT_JUDGED
PART_STOPPED = FailsafeReason.PART_STOPPED
TOUCHING = FailsafeReason.TOUCHING


@dataclass
class _Track:
    tid: int
    first_ns: int
    obs: list = field(default_factory=list)   # (t_ns, centre, start, end, captured, box)
    missed: int = 0
    decided: bool = False
    v: float = 0.0              # px (detector scale) per ns, along the belt
    still_since: int = 0        # t_ns since which it has not moved

    @property
    def centre(self) -> float:
        return self.obs[-1][1]

    @property
    def length(self) -> float:
        return self.obs[-1][3] - self.obs[-1][2]


@dataclass(frozen=True)
class LiveView:
    image: np.ndarray
    parts: tuple                       # ((Box, decided), ...) on this frame
    roi: Box
    line: tuple[int, int, int, int]    # x0, y0, x1, y1


class PresenceSelector(SelectorBase):
    """Parts found and tracked on a free-running camera; one decision per part.

    Detector (cheap: a few numpy passes over a downscaled grey ROI): difference from an
    empty-belt background (per-pixel median of the first learn_frames frames, then
    adapted slowly where no part is), minus the frame's median difference (lighting drift),
    over a threshold. The foreground is projected onto the belt axis: a part is a run of
    occupied columns, so a part whose interior matches the belt is not split in two.

    Behaviours (tests/test_parts.py):
    - debris: a run shorter than min_length or with less than min_area foreground is ignored.
    - one decision per track, when its centre crosses the reference line, on the frame
      (before or after the line) whose centre is nearest it; the gate time is the crossing
      time interpolated between those two frames. The part's box on that frame (along the
      belt: its run; across: the rows its foreground covers), grown by crop_margin of its
      size each side and clamped to the frame, goes with it: only that crop is inspected.
    - touching parts: a run longer than 1.6x the typical part length (learnt from single
      parts) is round(length / typical) parts, each FAILSAFE (touching_parts).
    - a part that stops before the line is FAILSAFE once (part_stopped) after stop_ms; if it
      moves on it is still the same track, never a second decision.
    - a part lost before the line (left unseen, camera stall) after 2+ sightings: FAILSAFE
      (part_not_judged), gate time extrapolated at the measured belt speed. A part first
      seen already past the line (appeared mid-ROI): the same.
    - parts passing while the background is learnt are not seen: start on an empty belt.
    """

    mode = "presence"

    def __init__(self, roi=(0.0, 0.0, 1.0, 1.0), direction: str = "+x", line: float = 0.5,
                 threshold: float = 30.0, min_length: float = 0.05, min_area: float = 0.01,
                 learn_frames: int = 15, adapt: float = 0.02, judge: str = "centred",
                 stop_ms: float = 1000.0, max_missed: int = 3, scale: int = 4,
                 crop_margin: float = 0.05):
        super().__init__()
        self.roi = tuple(roi)
        self.direction = direction
        self.line_f = line
        self.threshold = float(threshold)
        self.min_length_f, self.min_area_f = min_length, min_area
        self.learn_frames = learn_frames
        self.adapt = adapt
        self.judge = judge
        self.stop_ns = int(stop_ms * 1e6)
        self.max_missed = max_missed
        self.scale = max(1, int(scale))
        self.crop_margin = float(crop_margin)
        self._shape = None
        self._learn: list[np.ndarray] = []
        self.bg: np.ndarray | None = None
        self.noise = 0.0
        self._tracks: list[_Track] = []
        self._tid = 0
        self._lengths: collections.deque = collections.deque(maxlen=32)
        self.belt_v = 0.0           # px/ns at detector scale, from decided tracks
        self._view: LiveView | None = None

    # -- detector ------------------------------------------------------------------------
    def _setup(self, shape) -> None:
        h, w = shape[:2]
        x0, y0, x1, y1 = self.roi
        self._sl = (slice(int(y0 * h), max(int(y0 * h) + 1, int(y1 * h))),
                    slice(int(x0 * w), max(int(x0 * w) + 1, int(x1 * w))))
        rh = self._sl[0].stop - self._sl[0].start
        rw = self._sl[1].stop - self._sl[1].start
        self._size = (max(1, rw // self.scale), max(1, rh // self.scale))  # cv2: (w, h)
        self._shape = shape

    def grey(self, image: np.ndarray) -> np.ndarray:
        """The ROI, grey, downscaled and turned so the belt runs along axis 1, +."""
        if self._shape != image.shape:
            self._setup(image.shape)
            self.bg = None
            self._learn = []
            self._tracks = []
        sub = image[self._sl]
        if sub.ndim == 3:
            # green alone is luminance enough to see a part, at a third of cvtColor's cost
            sub = cv2.extractChannel(sub, 1)
        small = cv2.resize(sub, self._size, interpolation=cv2.INTER_AREA)
        if self.direction in ("+y", "-y"):
            small = small.T
        if self.direction in ("-x", "-y"):
            small = small[:, ::-1]
        return np.ascontiguousarray(small, dtype=np.float32)

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, int, int]] | None:
        """(start, end, area, across0, across1) runs along the belt axis, detector pixels
        ([across0, across1): the rows across the belt its foreground covers); None while
        learning."""
        g = self.grey(image)
        if self.bg is None:
            self._learn.append(g)
            if len(self._learn) < self.learn_frames:
                return None
            stack = np.stack(self._learn)
            self.bg = np.median(stack, axis=0).astype(np.float32)
            # The belt's own frame-to-frame noise (texture, sensor): the threshold never
            # goes below 5 of it, so a coarse belt texture is not a part.
            self.noise = float(np.median(np.abs(stack - self.bg)) * 1.4826)
            self._learn = []
            return None
        # cv2 rather than numpy arithmetic: the whole test must stay well under 1 ms a frame
        d = cv2.subtract(g, self.bg)
        off = float(np.median(d[::4, ::4]))     # lighting drift moves the whole ROI
        thr = max(self.threshold, 5.0 * self.noise)
        fg = cv2.absdiff(d, off) > thr
        h, L = fg.shape
        col = fg.sum(axis=0, dtype=np.int32)
        occ = col >= max(1, h // 20)
        runs = _runs(occ, gap=max(1, L // 50))
        min_len, min_area = self.min_length_f * L, self.min_area_f * L * h
        out = []
        busy = np.zeros(L, bool)
        for a, b in runs:
            area = float(col[a:b].sum())
            busy[max(0, a - 2):b + 2] = True
            if b - a >= min_len and area >= min_area:
                rows = np.flatnonzero(fg[:, a:b].sum(axis=1) >= max(1, (b - a) // 20))
                r0, r1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, h)
                out.append((float(a), float(b), area, r0, r1))
            else:
                self.counts["debris"] += 1
        if self.adapt > 0 and not busy.all():
            # only where no part is, or a stopped part would fade into the belt
            mask = np.ascontiguousarray(np.broadcast_to(~busy, fg.shape), dtype=np.uint8)
            cv2.accumulateWeighted(g, self.bg, self.adapt, mask)
        self._L = L
        return out

    def box(self, a: float, b: float, r0: int, r1: int) -> Box:
        """A detector run (along [a, b), across [r0, r1)) as a box in frame pixels, grown by
        crop_margin and clamped to the frame."""
        sw, sh = self._size
        if self.direction in ("-x", "-y"):
            n = sw if self.direction == "-x" else sh
            a, b = n - b, n - a
        if self.direction in ("+x", "-x"):
            cx, cy = (a, b), (r0, r1)
        else:
            cx, cy = (r0, r1), (a, b)
        ys, xs = self._sl
        kx = (xs.stop - xs.start) / sw
        ky = (ys.stop - ys.start) / sh
        box = Box(xs.start + int(cx[0] * kx), ys.start + int(cy[0] * ky),
                  xs.start + int(np.ceil(cx[1] * kx)), ys.start + int(np.ceil(cy[1] * ky)))
        return box.expand(self.crop_margin, self._shape[1], self._shape[0])

    # -- tracking ------------------------------------------------------------------------
    def feed(self, got: Captured) -> list[Part]:
        with self._lock:
            self.counts["frames"] += 1
            if got.image is None:
                return []
            runs = self.detect(got.image)
            if runs is None:
                self.counts["learning_frames"] += 1
                return []
            out = self._track(got, runs)
            # references only: the operator page draws it when (and if) it is asked for
            t = got.t_capture_ns
            self._view = LiveView(got.image, tuple((tr.obs[-1][5], tr.decided) for tr in self._tracks
                                                   if tr.obs[-1][0] == t), *self._roi_and_line())
            return out

    def _roi_and_line(self) -> tuple[Box, tuple[int, int, int, int]]:
        """The ROI and the reference line, in frame pixels."""
        ys, xs = self._sl
        roi = Box(xs.start, ys.start, xs.stop, ys.stop)
        f = self.line_f if self.direction in ("+x", "+y") else 1.0 - self.line_f
        if self.direction in ("+x", "-x"):
            x = int(xs.start + f * (xs.stop - xs.start))
            return roi, (x, ys.start, x, ys.stop - 1)
        y = int(ys.start + f * (ys.stop - ys.start))
        return roi, (xs.start, y, xs.stop - 1, y)

    def live_view(self) -> "LiveView | None":
        """The last frame with the parts tracked on it (box, decided yet), the ROI and the
        reference line: what the operator page's live view draws in presence mode."""
        with self._lock:
            return self._view

    def _track(self, got: Captured, runs) -> list[Part]:
        t = got.t_capture_ns
        L = self._L
        line = self.line_f * L
        out: list[Part] = []
        blobs = [((a + b) / 2, a, b) for a, b, *_ in runs]
        boxes = [self.box(a, b, r0, r1) for a, b, _, r0, r1 in runs]
        free_b = set(range(len(blobs)))
        pairs = []
        for ti, tr in enumerate(self._tracks):
            t_last, c_last = tr.obs[-1][0], tr.obs[-1][1]
            v = tr.v or self.belt_v
            pred = c_last + v * (t - t_last)
            for bi, (c, a, b) in enumerate(blobs):
                gate = 0.5 * max(tr.length, b - a) + 2
                if abs(c - pred) <= gate and c >= c_last - gate:
                    pairs.append((abs(c - pred), ti, bi))
        pairs.sort()
        used_t = set()
        for _, ti, bi in pairs:
            if ti in used_t or bi not in free_b:
                continue
            used_t.add(ti)
            free_b.discard(bi)
            tr = self._tracks[ti]
            c, a, b = blobs[bi]
            prev = tr.obs[-1]
            inside = a > 0 and b < L and prev[2] > 0 and prev[3] < L
            if inside and t > prev[0]:
                v = (c - prev[1]) / (t - prev[0])
                tr.v = v if not tr.v else tr.v + 0.5 * (v - tr.v)
            if abs(c - prev[1]) > 1.0:
                tr.still_since = t
            tr.obs.append((t, c, a, b, got, boxes[bi]))
            del tr.obs[:-4]                  # the frames the decision can still use
            tr.missed = 0
            if not tr.decided:
                if prev[1] < line <= c:
                    out += self._decide(tr, prev, tr.obs[-1], line)
                elif t - tr.still_since >= self.stop_ns:
                    tr.decided = True
                    out.append(self._failsafe(tr, PART_STOPPED, t,
                                              f"{PART_STOPPED}: not moved for "
                                              f"{(t - tr.still_since) / 1e9:.1f} s before the line"))
        for bi in sorted(free_b):
            c, a, b = blobs[bi]
            self._tid += 1
            tr = _Track(self._tid, t, [(t, c, a, b, got, boxes[bi])], still_since=t)
            self._tracks.append(tr)
            if c >= line and a > 0:
                # first seen past the line: its crossing was not seen
                tr.decided = True
                out.append(self._failsafe(tr, PART_NOT_JUDGED, self._t_at_line(tr, line),
                                          f"{PART_NOT_JUDGED}: first seen past the line"))
        keep = []
        for ti, tr in enumerate(self._tracks):
            if ti not in used_t and tr.obs[-1][0] != t:
                tr.missed += 1
                if tr.missed > self.max_missed:
                    if not tr.decided and len(tr.obs) >= 2:
                        out.append(self._failsafe(tr, PART_NOT_JUDGED, self._t_at_line(tr, line),
                                                  f"{PART_NOT_JUDGED}: lost before the line"))
                    elif not tr.decided:
                        self.counts["flicker"] += 1
                    continue
            keep.append(tr)
        self._tracks = keep
        return out

    def _t_at_line(self, tr: _Track, line: float) -> int:
        t, c = tr.obs[-1][0], tr.obs[-1][1]
        v = tr.v or self.belt_v
        return int(t + (line - c) / v) if v > 0 else t

    def _failsafe(self, tr: _Track, reason: FailsafeReason, t_ref: int, detail: str) -> Part:
        self.counts["parts"] += 1
        self._failsafe_counted(reason, f"track {tr.tid}: {detail}")
        return Part(None, t_ref, f"track:{tr.tid}", None, reason, detail)

    def _decide(self, tr: _Track, prev, cur, line: float) -> list[Part]:
        tr.decided = True
        (t0, c0, *_), (t1, c1, *_) = prev, cur
        t_cross = int(t0 + (line - c0) / (c1 - c0) * (t1 - t0)) if c1 > c0 else t1
        best = prev if abs(c0 - line) <= abs(c1 - line) else cur
        length = best[3] - best[2]
        if tr.v > 0:
            self.belt_v = tr.v if not self.belt_v else self.belt_v + 0.2 * (tr.v - self.belt_v)
        typical = float(np.median(self._lengths)) if len(self._lengths) >= 3 else 0.0
        if typical and length > 1.6 * typical:
            n = max(2, int(round(length / typical)))
            v = tr.v or self.belt_v
            parts = []
            for i in range(n):
                # sub-part i's centre passes the line earlier the further downstream it is
                sub_c = best[2] + (i + 0.5) * length / n
                t_i = int(t_cross - (sub_c - (best[2] + best[3]) / 2) / v) if v > 0 else t_cross
                parts.append(self._failsafe(tr, TOUCHING, t_i, f"{TOUCHING}: {n} parts in one "
                                            f"blob ({length:.0f} px, typical {typical:.0f})"))
            return parts
        self._lengths.append(length)
        self.counts["parts"] += 1
        extra = ()
        if self.judge == "worst":
            extra = tuple(o for o in tr.obs if o is not best and o[2] > 0 and o[3] < self._L)
        return [Part(best[4], t_cross, f"track:{tr.tid}", extra=tuple(o[4] for o in extra),
                     box=best[5], extra_boxes=tuple(o[5] for o in extra))]

    def tracks(self) -> int:
        with self._lock:
            return len(self._tracks)


def _runs(occ: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[start, end) runs of True, with holes of up to `gap` filled (a part whose middle
    matches the belt stays one part)."""
    if not occ.any():
        return []
    x = np.concatenate(([0], occ.view(np.int8), [0]))
    edges = np.flatnonzero(np.diff(x))
    starts, ends = edges[::2], edges[1::2]
    out = [[int(starts[0]), int(ends[0])]]
    for a, b in zip(starts[1:], ends[1:]):
        if a - out[-1][1] <= gap:
            out[-1][1] = int(b)
        else:
            out.append([int(a), int(b)])
    return [(a, b) for a, b in out]



__all__ = ["PresenceSelector"]
