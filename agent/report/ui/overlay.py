"""Pictures for the page: JPEG encoding, and the defect map drawn over a part's image.

A map is whatever an engine gives per image: an (h, w) float array, coarse (a classifier's
cells, a PatchCore patch grid) or full size. It is stretched over the image, so a cell
covers the region it scored. Classifier maps are probabilities in [0, 1]; anomaly maps are
unbounded distances, so those are scaled by their own maximum (where, not how much: the
score beside the image says how much).
"""

from __future__ import annotations

import cv2
import numpy as np

JPEG_QUALITY = 80
# Cells scoring below this share of the colour range stay uncoloured: a faint wash over a
# whole good board hides the one place that matters.
MAP_FLOOR = 0.25


def as_map(dmap) -> np.ndarray | None:
    """A (h, w) float32 map from what an engine gave ((1, h, w), (h, w, 1), (h, w, k): the
    worst defect class per cell), or None when there is nothing usable."""
    if dmap is None:
        return None
    m = np.asarray(dmap, dtype=np.float32)
    m = np.squeeze(m)
    if m.ndim == 3:
        m = m.max(axis=-1)
    if m.ndim != 2 or m.size == 0 or not np.all(np.isfinite(m)):
        return None
    return m


def to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    return image


# BGR: parts not yet decided (approaching the line), decided ones, the ROI and the line
PART_OPEN, PART_DECIDED, ROI_COLOUR, LINE_COLOUR = (0, 200, 0), (0, 160, 255), (200, 200, 200), (255, 0, 255)


def draw_parts(view) -> np.ndarray:
    """A presence selector's LiveView as the live picture: the frame, the ROI, the reference
    line and a box round every tracked part (green until judged, orange after)."""
    img = to_bgr(view.image).copy()
    t = max(1, min(img.shape[:2]) // 240)
    r = view.roi
    cv2.rectangle(img, (r.x0, r.y0), (r.x1 - 1, r.y1 - 1), ROI_COLOUR, t)
    x0, y0, x1, y1 = view.line
    cv2.line(img, (x0, y0), (x1, y1), LINE_COLOUR, t)
    for box, decided in view.parts:
        cv2.rectangle(img, (box.x0, box.y0), (box.x1 - 1, box.y1 - 1),
                      PART_DECIDED if decided else PART_OPEN, 2 * t)
    return img


def draw_overlay(image: np.ndarray, dmap) -> np.ndarray:
    """The image (BGR) with the map as a heat overlay and a box round its hottest cell."""
    base = to_bgr(image)
    if base.dtype != np.uint8:
        base = cv2.normalize(base, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    m = as_map(dmap)
    if m is None:
        return base
    lo = 0.0 if m.min() >= 0 else float(m.min())
    hi = 1.0 if m.max() <= 1.0 and lo >= 0 else float(m.max())
    norm = np.clip((m - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    h, w = base.shape[:2]
    # nearest: each model cell stays a visible square, not a blur that seems more precise
    big = cv2.resize(norm, (w, h), interpolation=cv2.INTER_NEAREST)
    heat = cv2.applyColorMap((big * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = np.where(big >= MAP_FLOOR, 0.25 + 0.35 * big, 0.0)[..., None]
    out = (base * (1 - alpha) + heat * alpha).astype(np.uint8)
    cy, cx = np.unravel_index(int(np.argmax(norm)), norm.shape)
    ch, cw = h / norm.shape[0], w / norm.shape[1]
    cv2.rectangle(out, (int(cx * cw), int(cy * ch)),
                  (int((cx + 1) * cw) - 1, int((cy + 1) * ch) - 1), (255, 255, 255), 2)
    return out


def fit_width(image: np.ndarray, max_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    if w <= max_w:
        return image
    return cv2.resize(image, (max_w, max(1, round(h * max_w / w))), interpolation=cv2.INTER_AREA)


def jpeg(image: np.ndarray, max_w: int = 960) -> bytes:
    img = fit_width(image, max_w)
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"cannot encode a {image.shape} image as JPEG")
    return buf.tobytes()
