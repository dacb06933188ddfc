"""Saves every rejected part's image (and a sample of passes) with its inspection JSON,
for retraining, under a disk quota (oldest deleted first).

It runs in its own thread behind a bounded queue: the pipeline never waits for the disk.
A full queue or a full/broken disk drops the image (logged, counted), never the verdict.

Layout: <dir>/<YYYYMMDD>/<verdict>/<part>.png + <part>.json, and <part>_map.png when the part
has a defect map (an anomaly bundle's REJECT): the map as a colour heat overlay on the image,
for a person. The three are one unit: counted in the quota together, deleted together.

Alerts come first: the recorder keeps its disk's free space above ``min_free_mb`` (deleting
its oldest images, then refusing new ones: "disk_floor"), and saves nothing while ``hold()``
says so ("outbox_priority": the alert outbox has hit a full disk), so it never eats space
freed for alerts.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from agent.types import Inspection, Verdict

log = logging.getLogger("recorder")

MAP_SUFFIX = "_map.png"     # <part>_map.png beside <part>.<ext>: the defect map drawn on it


def map_path(image_path: str | Path) -> Path:
    p = Path(image_path)
    return p.with_name(p.stem + MAP_SUFFIX)


def _unit_stem(path: str) -> str:
    """The stem shared by an image, its .json and its _map.png."""
    return path[:-len(MAP_SUFFIX)] if path.endswith(MAP_SUFFIX) else os.path.splitext(path)[0]


class Recorder:
    def __init__(self, directory: str | Path, max_mb: float = 2048, pass_sample: float = 0.01,
                 *, queue_size: int = 64, ext: str = ".png", seed: int | None = None,
                 min_free_mb: float = 0.0, hold: Callable[[], bool] | None = None):
        self.dir = Path(directory)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.hold = hold
        self.pass_sample = float(pass_sample)
        self.ext = ext
        self._q: queue.Queue = queue.Queue(queue_size)
        self._rng = random.Random(seed)
        self._thread: threading.Thread | None = None
        # (paths of one image: its picture, its .json and its _map.png if any, bytes), oldest
        # first: the quota deletes them together, never a .json without its picture
        self._files: collections.deque = collections.deque()
        self.bytes = 0
        self.saved = 0
        self.deleted = 0
        self.dropped: collections.Counter = collections.Counter()
        self._last_err_log = 0.0
        self._idle = threading.Event()
        self._idle.set()

    # -- pipeline side (output thread) ---------------------------------------------------
    def want(self, insp: Inspection) -> str | None:
        """Decide whether this part's image is kept; the path it will get, or None."""
        if insp.image is None:
            return None
        if insp.verdict is Verdict.PASS and not (self.pass_sample > 0 and
                                                 self._rng.random() < self.pass_sample):
            return None
        if self._q.full():
            self.dropped["queue_full"] += 1
            return None
        day = time.strftime("%Y%m%d", time.localtime(insp.t_wall))
        return str(self.dir / day / insp.verdict.value.lower() / (insp.part_id + self.ext))

    def put(self, path: str, image: np.ndarray, record: dict,
            defect_map: np.ndarray | None = None) -> bool:
        """Queue one image (and its map, drawn in the recorder thread) for saving."""
        try:
            self._q.put_nowait((path, image, record, defect_map))
            self._idle.clear()
            return True
        except queue.Full:
            self.dropped["queue_full"] += 1
            return False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "Recorder":
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._q.put(None)
        self._thread.join(timeout)
        self._thread = None

    def wait_idle(self, timeout: float = 5.0) -> bool:
        return self._idle.wait(timeout)

    def counters(self) -> dict:
        return {"saved": self.saved, "deleted": self.deleted, "bytes": self.bytes,
                "dropped": dict(self.dropped), "queued": self._q.qsize()}

    # -- the recorder thread -------------------------------------------------------------
    def _scan(self) -> None:
        pairs: dict[str, list] = {}     # stem -> [oldest mtime, paths, bytes]
        if self.dir.is_dir():
            for root, _dirs, files in os.walk(self.dir):
                for f in files:
                    if f.endswith(".json") or f.endswith(self.ext) or f.endswith(MAP_SUFFIX):
                        p = os.path.join(root, f)
                        try:
                            st = os.stat(p)
                        except OSError:
                            continue
                        e = pairs.setdefault(_unit_stem(p), [st.st_mtime, [], 0])
                        e[0] = min(e[0], st.st_mtime)
                        e[1].append(p)
                        e[2] += st.st_size
        for stem, (_m, paths, size) in sorted(pairs.items(), key=lambda kv: (kv[1][0], kv[0])):
            self._files.append((tuple(paths), size))
            self.bytes += size
        self._enforce()

    def _run(self) -> None:
        try:
            self._scan()
        except Exception:  # noqa: BLE001
            log.exception("recorder: cannot scan %s", self.dir)
        while True:
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                self._idle.set()
                continue
            if item is None:
                self._idle.set()
                return
            try:
                self._save(*item)
            except Exception:  # noqa: BLE001 - never let the recorder thread die
                log.exception("recorder: unexpected error")
                self.dropped["error"] += 1
            if self._q.empty():
                self._idle.set()

    def _free_bytes(self) -> int | None:
        d = self.dir
        while not d.exists() and d != d.parent:
            d = d.parent
        try:
            st = os.statvfs(d)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _room_for(self, size: int) -> bool:
        """Keep min_free_bytes free after writing `size`: delete the oldest images first."""
        if self.min_free_bytes <= 0:
            return True
        while True:
            free = self._free_bytes()
            if free is None or free - size >= self.min_free_bytes:
                return True
            if not self._files:
                return False
            self._delete_oldest()

    def _save(self, path: str, image: np.ndarray, record: dict,
              defect_map: np.ndarray | None = None) -> None:
        img_path = Path(path)
        json_path = img_path.with_suffix(".json")
        written: list[Path] = []
        if self.hold is not None and self.hold():
            self.dropped["outbox_priority"] += 1
            return
        try:
            ok, buf = cv2.imencode(self.ext, image)
            if not ok:
                raise ValueError(f"cannot encode a {image.shape} image as {self.ext}")
            data = buf.tobytes()
            files = [(img_path, data)]
            if defect_map is not None:
                # the record is the alert payload (shared): a copy names the map
                record = {**record, "map": map_path(img_path).name}
            meta = json.dumps(record, default=str, indent=1).encode()
            files.append((json_path, meta))
            if defect_map is not None:
                from .ui.overlay import draw_overlay     # cv2.applyColorMap blended on the image
                ok, mbuf = cv2.imencode(".png", draw_overlay(image, defect_map))
                if not ok:
                    raise ValueError(f"cannot encode the defect map of a {image.shape} image")
                files.append((map_path(img_path), mbuf.tobytes()))
            size = sum(len(d) for _, d in files)
            if not self._room_for(size):
                self.dropped["disk_floor"] += 1
                self._log_drop(record, "disk_floor", f"free space below recorder.min_free_mb "
                               f"({self.min_free_bytes // (1024 * 1024)} MB)")
                return
            img_path.parent.mkdir(parents=True, exist_ok=True)
            for p, d in files:
                with open(p, "wb") as f:
                    written.append(p)
                    f.write(d)
        except (OSError, ValueError, cv2.error) as e:
            for p in written:
                try:
                    p.unlink()
                except OSError:
                    pass
            reason = "disk_full" if isinstance(e, OSError) and e.errno == 28 else \
                "write_error" if isinstance(e, OSError) else "encode_error"
            self.dropped[reason] += 1
            self._log_drop(record, reason, e)
            return
        self._files.append((tuple(str(p) for p, _ in files), size))
        self.bytes += size
        self.saved += 1
        self._enforce()

    def _log_drop(self, record: dict, reason: str, why) -> None:
        now = time.monotonic()
        if now - self._last_err_log > 10:
            self._last_err_log = now
            log.error("recorder: image of part %s not saved (%s): %s",
                      record.get("part"), reason, why)

    def _enforce(self) -> None:
        while self.bytes > self.max_bytes and self._files:
            self._delete_oldest()

    def _delete_oldest(self) -> None:
        paths, size = self._files.popleft()
        # the picture first: a failure leaves at worst a picture without its .json
        for p in sorted(paths, key=lambda p: p.endswith(".json")):
            try:
                os.unlink(p)
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("recorder: cannot delete %s: %s", p, e)
        self.bytes -= size
