"""The ONE place that turns a camera frame into model input.

Training (convert/), evaluation and the daemon all call `preprocess`, so the accuracy
measured at export is the accuracy the line sees. Output is uint8 pixels shaped
(tiles * views, H, W, C); `to_input_tensor` applies the model's input quantization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

Fit = Literal["stretch", "letterbox", "center_crop"]
Color = Literal["gray", "rgb", "bgr"]
VIEWS = (1, 2, 4)


@dataclass(frozen=True)
class InputSpec:
    width: int
    height: int
    channels: int = 1
    color: Color = "gray"
    fit: Fit = "stretch"
    # (x, y, w, h) in source pixels, applied before tiling and fitting.
    roi: tuple[int, int, int, int] | None = None
    # The (ROI of the) frame is cut into rows x cols tiles, each fitted to width x height:
    # small defects stay visible without a huge model input.
    tiles: tuple[int, int] = (1, 1)
    pad_value: int = 0
    # Each tile is also given to the model mirrored: 1 (as is), 2 (+ left-right) or 4 (+ up-
    # down, + both); agent.decide averages a tile's views. The max over a defect map's cells
    # is a noisy statistic, and its noise is not mirror-symmetric: on DeepPCB, 4 views raised
    # the test AUC of 10 of 10 trained models (benchmarks/README.md) for 4 model runs a frame.
    views: int = 1

    def __post_init__(self):
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"input size must be positive, got {self.width}x{self.height}")
        if (self.color == "gray") != (self.channels == 1):
            raise ValueError(f"color {self.color!r} does not match channels={self.channels}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.fit not in ("stretch", "letterbox", "center_crop"):
            raise ValueError(f"unknown fit {self.fit!r}")
        if self.tiles[0] < 1 or self.tiles[1] < 1:
            raise ValueError(f"tiles must be >= 1, got {self.tiles}")
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {self.views!r}")

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def batch(self) -> int:
        """Model inputs per frame: every view of every tile."""
        return self.n_tiles * self.views

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roi"] = list(self.roi) if self.roi else None
        d["tiles"] = list(self.tiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        if d.get("roi") is not None:
            d["roi"] = tuple(int(v) for v in d["roi"])
        if "tiles" in d:
            d["tiles"] = tuple(int(v) for v in d["tiles"])
        return cls(**d)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        # Float frames are taken as 0..1 when they fit there, else as 0..255.
        scale = 255.0 if float(image.max(initial=0.0)) <= 1.0 else 1.0
        return np.clip(image * scale, 0, 255).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def _convert_color(image: np.ndarray, color: Color) -> np.ndarray:
    """OpenCV frames are gray (H, W), (H, W, 1), BGR or BGRA."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        if color == "gray":
            return image
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if color == "bgr" else cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"unsupported frame shape {image.shape}: expected gray, BGR or BGRA")
    four = image.shape[2] == 4
    if color == "gray":
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if four else cv2.COLOR_BGR2GRAY)
    if color == "rgb":
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if four else cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if four else image


def _fit(img: np.ndarray, w: int, h: int, fit: Fit, pad: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if fit == "center_crop":
        # Crop the largest centred region of the target aspect, then resize.
        target = w / h
        if iw / ih > target:
            cw, ch = max(1, round(ih * target)), ih
        else:
            cw, ch = iw, max(1, round(iw / target))
        x0, y0 = (iw - cw) // 2, (ih - ch) // 2
        img = img[y0:y0 + ch, x0:x0 + cw]
        ih, iw = ch, cw
    if fit == "letterbox":
        s = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * s)), max(1, round(ih * s))
        resized = _resize(img, nw, nh)
        out = np.full((h, w) + img.shape[2:], pad, dtype=np.uint8)
        x0, y0 = (w - nw) // 2, (h - nh) // 2
        out[y0:y0 + nh, x0:x0 + nw] = resized
        return out
    return _resize(img, w, h)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if (iw, ih) == (w, h):
        return img
    interp = cv2.INTER_AREA if (w < iw and h < ih) else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def preprocess(image: np.ndarray, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Frame -> uint8 pixels (tiles * views, H, W, C), each tile followed by its mirror views.
    Any size, 1/3/4 channels, 8/16-bit or float.

    `out`, when given, is a preallocated array of spec.shape reused across frames.
    """
    if image is None or image.size == 0:
        raise ValueError("empty frame")
    img = _convert_color(_to_uint8(image), spec.color)
    if spec.roi is not None:
        x, y, w, h = spec.roi
        ih, iw = img.shape[:2]
        if x >= iw or y >= ih:
            raise ValueError(f"ROI {spec.roi} lies outside the {iw}x{ih} frame")
        img = img[y:min(y + h, ih), x:min(x + w, iw)]
    if out is None:
        out = np.empty(spec.shape, dtype=np.uint8)
    rows, cols = spec.tiles
    ih, iw = img.shape[:2]
    v = spec.views
    for r in range(rows):
        y0, y1 = ih * r // rows, ih * (r + 1) // rows
        for c in range(cols):
            x0, x1 = iw * c // cols, iw * (c + 1) // cols
            tile = _fit(img[y0:y1, x0:x1], spec.width, spec.height, spec.fit, spec.pad_value)
            out[(r * cols + c) * v] = tile.reshape(spec.height, spec.width, spec.channels)
    _mirror(out, v)
    return out


def add_views(pixels: np.ndarray, views: int) -> np.ndarray:
    """(tiles, H, W, C) pixels of a views=1 spec -> (tiles * views, H, W, C), as `preprocess`
    lays them out for a spec with that many views (training keeps one view per image)."""
    if views == 1:
        return pixels
    out = np.empty((pixels.shape[0] * views,) + pixels.shape[1:], dtype=pixels.dtype)
    out[::views] = pixels
    _mirror(out, views)
    return out


def _mirror(out: np.ndarray, views: int) -> None:
    """Fill each tile's views from its first: left-right, up-down, both."""
    if views == 1:
        return
    base = out[::views]
    out[1::views] = base[:, :, ::-1]
    if views == 4:
        out[2::views] = base[:, ::-1]
        out[3::views] = base[:, ::-1, ::-1]


def to_input_tensor(pixels: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """uint8 pixels -> the model's input tensor, given its quantization (scale, zero_point).

    Our trainer builds models whose float input is the raw 0..255 pixel value, so a uint8
    model input normally has scale 1 and zero point 0 and this is a no-op.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return pixels.astype(np.float32)
    if scale == 0:
        raise ValueError("model input is integer but carries no quantization scale")
    if dtype == np.uint8 and abs(scale - 1.0) < 1e-6 and zero_point == 0:
        return pixels
    if dtype == np.int8 and abs(scale - 1.0) < 1e-6 and zero_point == -128:
        return (pixels.astype(np.int16) - 128).astype(np.int8)
    info = np.iinfo(dtype)
    q = np.round(pixels.astype(np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)
