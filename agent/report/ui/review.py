"""The review queue: recorded images (agent/report/recorder.py's layout) a person marks good or
defect. Marks go to one append-only file beside the images, `<recorder dir>/reviews.jsonl`
(the last mark of an image wins), which the recorder's quota never counts or deletes: the
images age out under the quota, the labels stay; export-labels says how many it missed.

Every path a request names is relative to the recorder directory and is checked here, the
one place: plain names only, no '..', no absolute paths, nothing left encoded, and the
resolved file must still be inside the directory (a symlink out is refused too).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.report.recorder import MAP_SUFFIX, map_path

REVIEWS = "reviews.jsonl"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
GOOD = "good"               # convert/data.py's pass class folder
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_WHO = re.compile(r"[^\w .@-]+")
# folder names the trainer reads as something other than a class
RESERVED = {"train", "test", "val", "annotations"}


class BadPath(ValueError):
    """A path that names nothing inside the recorder directory."""


@dataclass(frozen=True, slots=True)
class Review:
    image: str        # relative to the recorder directory, '/'-separated
    label: str        # "good" or one of the bundle's defect labels
    by: str
    at: float         # time.time()
    verdict: str = ""   # what the line decided (from the recorder's record)
    score: float | None = None


def safe_relpath(rel: str) -> str:
    """`rel` as a checked relative path, or BadPath. Callers decode the URL once; whatever
    is still encoded ('%2e%2e', '%252e') is refused rather than decoded again."""
    if not isinstance(rel, str) or not rel or len(rel) > 512:
        raise BadPath("no path")
    parts = rel.split("/")
    for p in parts:
        if p in ("", ".", "..") or not _SEGMENT.fullmatch(p):
            raise BadPath(f"not a recorded image: {rel!r}")
    return "/".join(parts)


def clean_who(who: str | None) -> str:
    who = _WHO.sub("", (who or "").strip())[:64].strip()
    return who or "operator"


class ReviewStore:
    def __init__(self, root: str | Path, defect_labels: list[str], clock=time.time):
        self.root = Path(root)
        self.labels = [GOOD] + [d for d in defect_labels if d != GOOD]
        self.path = self.root / REVIEWS
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int], dict[str, Review]] | None = None
        self._records: dict[str, tuple[float, dict]] = {}

    # -- paths ---------------------------------------------------------------------------
    def resolve(self, rel: str) -> Path:
        rel = safe_relpath(rel)
        if not rel.lower().endswith(IMAGE_EXTS):
            raise BadPath(f"not an image: {rel!r}")
        root = self.root.resolve()
        p = (root / rel).resolve()
        if root not in p.parents or not p.is_file():
            raise BadPath(f"no recorded image {rel!r}")
        return p

    # -- marks ---------------------------------------------------------------------------
    def reviews(self) -> dict[str, Review]:
        """Image -> its latest mark (re-read only when the file changed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            out: dict[str, Review] = {}
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = Review(**json.loads(line))
                    except (ValueError, TypeError):
                        continue      # a torn last line after a power cut: skip, keep the rest
                    out[r.image] = r
            self._cache = (key, out)
            return out

    def mark(self, rel: str, label: str, by: str | None) -> Review:
        p = self.resolve(rel)
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of {self.labels}")
        rel = p.relative_to(self.root.resolve()).as_posix()
        rec = self._record(p)
        r = Review(rel, label, clean_who(by), round(self.clock(), 3),
                   str(rec.get("verdict", "")), rec.get("score"))
        line = json.dumps(asdict(r), separators=(",", ":")) + "\n"
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            # one write() of one line in append mode: concurrent marks never interleave
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return r

    # -- the queue -----------------------------------------------------------------------
    def _record(self, image: Path) -> dict:
        """The recorder's JSON beside an image (cached: it never changes once written)."""
        key = str(image)
        hit = self._records.get(key)
        if hit is not None:
            return hit[1]
        try:
            rec = json.loads(image.with_suffix(".json").read_text())
        except (OSError, ValueError):
            rec = {}
        if len(self._records) > 5000:
            self._records.clear()
        self._records[key] = (time.time(), rec)
        return rec

    def recorded(self, limit: int = 200) -> list[Path]:
        """The newest recorded images first (<day>/<verdict>/<part>.<ext>)."""
        out: list[tuple[float, Path]] = []
        if not self.root.is_dir():
            return []
        for day in sorted((d for d in self.root.iterdir() if d.is_dir()), reverse=True):
            for verdict_dir in (d for d in day.iterdir() if d.is_dir()):
                for f in os.scandir(verdict_dir):
                    # <part>_map.png is the recorder's drawing of a part's map, not a part
                    if f.is_file() and f.name.lower().endswith(IMAGE_EXTS) and \
                            not f.name.endswith(MAP_SUFFIX):
                        out.append((f.stat().st_mtime, Path(f.path)))
            if len(out) >= limit:
                break
        out.sort(key=lambda t: t[0], reverse=True)
        return [p for _, p in out[:limit]]

    def queue(self, limit: int = 200) -> dict:
        marks = self.reviews()
        root = self.root.resolve()
        items = []
        for p in self.recorded(limit):
            rel = p.resolve().relative_to(root).as_posix()
            rec = self._record(p)
            m = marks.get(rel)
            mp = map_path(p)
            items.append({"path": rel, "part": rec.get("part", p.stem),
                          "map": mp.resolve().relative_to(root).as_posix() if mp.is_file()
                          else None,
                          "verdict": rec.get("verdict", p.parent.name.upper()),
                          "label": rec.get("label", ""), "score": rec.get("score"),
                          "t": rec.get("t_capture"), "reason": rec.get("reason", ""),
                          "review": asdict(m) if m else None})
        # unreviewed first, newest first within each
        items.sort(key=lambda i: i["review"] is not None)
        return {"labels": self.labels, "items": items,
                "pending": sum(1 for i in items if i["review"] is None),
                "reviewed": len(marks)}
