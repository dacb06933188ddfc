"""Frame sources through OpenCV: a V4L2 device, an RTSP/HTTP stream, a video file, a folder.

A source is opened, read and closed by the pipeline's capture thread, which owns the
reconnect-with-backoff and stall logic; a source only says what happened:

    src = open_source("/data/parts", loop=True)
    src.open()                   # raises SourceError when it cannot open now
    got = src.read()             # Captured, or None at the end of a non-looping file/folder
                                 # raises SourceError when it failed (reopen with backoff)

`live` sources (cameras, streams) deliver frames at their own pace and must be read
continuously; file and folder sources are read as fast as the pipeline consumes them
(or at a configured fps).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import cv2
import numpy as np

from agent.config import _is_url
from agent.images import IMAGE_EXTS

log = logging.getLogger("source")


class SourceError(Exception):
    """The source failed (cannot open, read error, vanished); the capture thread reopens it."""


@dataclass(slots=True)
class Captured:
    image: np.ndarray | None       # None with `error` set: a part was there, unreadable
    ref: str                       # file name or "<source>#<index>"
    t_capture_ns: int              # monotonic_ns when the frame was grabbed
    t_decoded_ns: int              # monotonic_ns when it was decoded
    error: str | None = None


class Source:
    live: bool = False
    name: str = "source"

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> Captured | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


def open_source(spec, *, loop: bool = False, width: int | None = None,
                height: int | None = None, read_timeout_s: float = 5.0) -> Source:
    """The right Source for a config's camera.source (not opened yet)."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return CaptureSource(int(spec), live=True, width=width, height=height)
    spec = str(spec)
    if _is_url(spec):
        return CaptureSource(spec, live=True, read_timeout_s=read_timeout_s)
    if spec.startswith("/dev/"):
        return CaptureSource(spec, live=True, width=width, height=height)
    if os.path.isdir(spec):
        return FolderSource(spec, loop=loop)
    return VideoFileSource(spec, loop=loop)


class CaptureSource(Source):
    """A V4L2 device (index or path) or a network stream (rtsp://, http://)."""

    def __init__(self, target, *, live: bool = True, width=None, height=None,
                 read_timeout_s: float = 5.0):
        self.target = target
        self.live = live
        self.width, self.height = width, height
        self.read_timeout_s = read_timeout_s
        self.cap: cv2.VideoCapture | None = None
        self.index = 0
        self.name = str(target)

    def open(self) -> None:
        t = self.target
        if isinstance(t, int) or (isinstance(t, str) and t.startswith("/dev/")):
            cap = cv2.VideoCapture(t, cv2.CAP_V4L2)
            if not cap.isOpened():
                cap = cv2.VideoCapture(t)
        else:
            ms = int(self.read_timeout_s * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            try:
                cap = cv2.VideoCapture(t, cv2.CAP_FFMPEG, params)
            except cv2.error:
                cap = cv2.VideoCapture(t)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.name}")
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        with _suppress():
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)   # the newest frame, not a stale backlog
        self.cap = cap

    def read(self) -> Captured | None:
        cap = self.cap
        if cap is None:
            raise SourceError(f"{self.name} is not open")
        if not cap.grab():
            raise SourceError(f"{self.name}: no frame (disconnected or stalled)")
        t0 = time.monotonic_ns()
        ok, img = cap.retrieve()
        t1 = time.monotonic_ns()
        if not ok or img is None:
            raise SourceError(f"{self.name}: frame could not be decoded")
        self.index += 1
        return Captured(img, f"{self.name}#{self.index}", t0, t1)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class VideoFileSource(Source):
    """A video file, read at decode speed (or paced by the pipeline's fps). At the end it
    loops (reopening the file, so a replaced or vanished file is noticed) or ends."""

    live = False

    def __init__(self, path, *, loop: bool = False):
        self.path = str(path)
        self.loop = loop
        self.cap: cv2.VideoCapture | None = None
        self.index = 0          # frames read in the current pass
        self.count = 0          # frame count the container claims
        self.name = os.path.basename(self.path)

    def open(self) -> None:
        if not os.path.isfile(self.path):
            raise SourceError(f"video file {self.path} does not exist")
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video file {self.path} (not a video, or truncated)")
        self.count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if self.index:
            # A reopen after a failure: carry on where we were.
            if self.count and self.index >= self.count:
                self.index = 0
            else:
                cap.set(cv2.CAP_PROP_POS_FRAMES, self.index)
        self.cap = cap

    def read(self) -> Captured | None:
        if self.cap is None:
            raise SourceError(f"{self.name} is not open")
        ok = self.cap.grab()
        if not ok:
            if self.count and self.index < self.count - 1:
                raise SourceError(f"{self.name}: read failed at frame {self.index} of "
                                  f"{self.count} (file truncated or corrupt?)")
            if not self.loop:
                return None
            # Loop by reopening: notices a file that was replaced or has vanished.
            self.close()
            self.index = 0
            self.open()
            if not self.cap.grab():
                raise SourceError(f"{self.name}: no frame after reopening")
        t1 = time.monotonic_ns()
        ok, img = self.cap.retrieve()
        t2 = time.monotonic_ns()
        if not ok or img is None:
            raise SourceError(f"{self.name}: frame {self.index} could not be decoded")
        ref = f"{self.name}#{self.index}"
        self.index += 1
        # A file has no capture instant: like a camera's, the frame counts as captured when
        # grab() delivers it.
        return Captured(img, ref, t1, t2)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FolderSource(Source):
    """Image files of a folder in sorted name order; the file name travels as the reference.

    A file that cannot be read or decoded is still a part: it comes back with `error` set
    (the pipeline FAILSAFEs it). A vanished folder raises SourceError; after a reopen the
    folder carries on after the last file read."""

    live = False

    def __init__(self, path, *, loop: bool = False):
        self.path = str(path)
        self.loop = loop
        self.files: list[str] = []
        self.pos = 0
        self.last: str | None = None
        self.name = os.path.basename(os.path.normpath(self.path)) or self.path

    def _list(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except OSError as e:
            raise SourceError(f"image folder {self.path}: {e.strerror or e}") from None
        return sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS
                      and not n.startswith("."))

    def open(self) -> None:
        if not os.path.isdir(self.path):
            raise SourceError(f"image folder {self.path} does not exist")
        self.files = self._list()
        if self.last is not None:
            self.pos = next((i for i, n in enumerate(self.files) if n > self.last), len(self.files))
        else:
            self.pos = 0

    def read(self) -> Captured | None:
        while True:
            if self.pos >= len(self.files):
                if not self.loop:
                    return None
                self.files = self._list()
                self.pos = 0
                self.last = None
                if not self.files:
                    raise SourceError(f"image folder {self.path} holds no images")
            name = self.files[self.pos]
            full = os.path.join(self.path, name)
            t0 = time.monotonic_ns()
            try:
                data = np.fromfile(full, dtype=np.uint8)
            except FileNotFoundError:
                if not os.path.isdir(self.path):
                    # not read: after the reopen, carry on with this very file
                    raise SourceError(f"image folder {self.path} vanished") from None
                self.pos += 1
                self.last = name
                log.warning("%s vanished before it was read; skipping it", full)
                continue
            except OSError as e:
                self.pos += 1
                self.last = name
                return Captured(None, name, t0, time.monotonic_ns(), f"unreadable: {e.strerror or e}")
            self.pos += 1
            self.last = name
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
            t1 = time.monotonic_ns()
            if img is None or img.size == 0:
                return Captured(None, name, t0, t1, "corrupt image: cannot decode")
            return Captured(img, name, t0, t1)

    def close(self) -> None:
        pass


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
