"""Synthetic inspection datasets for tests and benchmarks (no downloads, deterministic).

`make_synthetic_dataset(root, n_per_class, size, seed)` writes root/good/ and root/defect/:
'good' images are smooth textured surfaces with a regular pattern; 'defect' images are the
same kind of surface with a small dark/bright blob or a thin scratch somewhere. Files mix
PNG, JPEG and BMP, gray and colour, and (with vary_size) several sizes, like a real line.

`train_tiny_bundle(data_dir, out_dir)` trains a small bundle fast (seconds) for tests that
need a working bundle (the daemon's end-to-end tests, say).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

EXTS = (".png", ".jpg", ".bmp")


def _surface(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(90, 160)
    noise = cv2.GaussianBlur(rng.normal(0, 18, (h, w)).astype(np.float32), (0, 0), 2.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(8, 14)
    angle = rng.uniform(0, np.pi)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    grad = rng.uniform(-15, 15) * (xx / w - 0.5)
    return base + noise + stripes + grad


def _defect(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    m = max(4, min(h, w) // 8)
    cx, cy = int(rng.integers(m, w - m)), int(rng.integers(m, h - m))
    delta = float(rng.choice([-1, 1]) * rng.uniform(100, 140))
    mask = np.zeros((h, w), np.float32)
    if rng.random() < 0.5:
        r = max(3, int(min(h, w) * rng.uniform(0.08, 0.13)))
        cv2.circle(mask, (cx, cy), r, 1.0, -1)
    else:
        L = min(h, w) * rng.uniform(0.2, 0.4)
        a = rng.uniform(0, np.pi)
        p1 = (int(cx - L / 2 * np.cos(a)), int(cy - L / 2 * np.sin(a)))
        p2 = (int(cx + L / 2 * np.cos(a)), int(cy + L / 2 * np.sin(a)))
        cv2.line(mask, p1, p2, 1.0, max(2, min(h, w) // 20))
    mask = cv2.GaussianBlur(mask, (0, 0), 0.8)
    return img + delta * mask, mask


def make_synthetic_dataset(root, n_per_class: int = 20, size: int = 64, seed: int = 0, *,
                           classes=("good", "defect"), vary_size: bool = True,
                           mixed_formats: bool = True, annotate: bool = False) -> Path:
    """Write root/<class>/*.{png,jpg,bmp}; returns root. Any non-'good' class gets defects.
    With annotate, each defect's box goes to root/annotations/<stem>.txt (x1 y1 x2 y2)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in classes:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            s = size
            if vary_size and i % 3 == 1:
                s = int(size * 1.25)
            elif vary_size and i % 3 == 2:
                s = int(size * 0.875)
            img = _surface(rng, s, s)
            box = None
            if cls != "good":
                img, mask = _defect(rng, img)
                ys, xs = np.nonzero(mask > 0.1)
                box = (xs.min(), ys.min(), xs.max(), ys.max())
            img = np.clip(img, 0, 255).astype(np.uint8)
            if mixed_formats and i % 2 == 1:   # colour: a tinted copy
                tint = rng.uniform(0.9, 1.1, 3)
                img = np.clip(np.stack([img * t for t in tint], -1), 0, 255).astype(np.uint8)
            ext = EXTS[i % 3] if mixed_formats else ".png"
            name = d / f"{cls}_{i:04d}{ext}"
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
            cv2.imwrite(str(name), img, params)
            if annotate and box is not None:
                (root / "annotations").mkdir(exist_ok=True)
                (root / "annotations" / f"{name.stem}.txt").write_text("%d %d %d %d 1\n" % box)
    return root


def train_tiny_bundle(data_dir, out_dir, *, epochs: int = 12, input_size: int = 48, seed: int = 0,
                      **overrides) -> dict:
    """Train a small bundle quickly (a few seconds on 2 cores). Returns train_bundle's summary.
    The from-scratch backbone unless overridden: the pretrained one needs its weights package
    and costs more than these tests want.

    Imports TensorFlow (training side); the bundle it writes is read by agent.bundle.
    """
    from .train import TrainOptions, train_bundle

    opts = TrainOptions(**{**dict(epochs=epochs, input_size=(input_size, input_size), seed=seed,
                                  patience=epochs, verbose=False, representative=50, color="gray",
                                  batch_size=8, backbone="scratch"), **overrides})
    return train_bundle(Path(data_dir), Path(out_dir), opts)
