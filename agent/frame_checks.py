"""Frame sanity checks: a frame that shows nothing must not be judged.

A capped lens, a dead light or a camera that keeps sending its last frame gives images the
model was never trained on; an all-black frame scores like a good part and would PASS every
part on the line. These checks run before inference and make such a part FAILSAFE with its
own reason:

    blank_frame          near-uniform: (almost) no contrast anywhere
    frozen_frame         bit-identical to the frame before (a real sensor always has noise)
    frame_out_of_range   brightness or contrast far outside the training images' (needs the
                         bundle's input_stats; without them only the two checks above run)

The training side records the statistics with the same function the agent uses:

    stats = [image_stats(cv2.imread(p, cv2.IMREAD_UNCHANGED)) for p in training_images]
    write_manifest(..., input_stats=summarize_stats(stats))

bundle.json then carries (all values on a 0-255 grey scale):

    "input_stats": {"version": 1, "n": 412,
                    "mean": {"min": 61.2, "max": 148.9, "mean": 101.3, "std": 14.2},
                    "std":  {"min": 18.0, "max": 57.5, "mean": 33.1, "std": 6.9}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.types import FailsafeReason

BLANK = FailsafeReason.BLANK
FROZEN = FailsafeReason.FROZEN
OUT_OF_RANGE = FailsafeReason.OUT_OF_RANGE
REASONS = (BLANK, FROZEN, OUT_OF_RANGE)

STATS_VERSION = 1
# Statistics are taken on a strided view at most this many pixels on its longer side: a
# few hundred microseconds for any frame size, and the same view for trainer and agent.
_VIEW = 256
# Brightness and contrast may stray this many grey levels beyond the training range
# before "far outside" applies, however narrow the training set was.
_FLOOR = {"mean": 12.0, "std": 6.0}


class StatsError(ValueError):
    """input_stats in a bundle that cannot be used; the message says which field."""


def _gray_view(image: np.ndarray) -> np.ndarray:
    """A strided grey view of the frame as float32 on 0-255, whatever its dtype/channels."""
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"not an image: shape {img.shape}")
    step = max(1, -(-max(img.shape[:2]) // _VIEW))
    v = img[::step, ::step]
    if v.ndim == 3:
        # equal weights: no colour-order assumption (BGR from OpenCV, RGB elsewhere)
        v = v[..., 0] if v.shape[2] == 1 else v[..., :3].mean(axis=2, dtype=np.float32)
    v = v.astype(np.float32, copy=False)
    if img.dtype == np.uint8:
        return v
    if np.issubdtype(img.dtype, np.integer):
        return v * (255.0 / np.iinfo(img.dtype).max)
    return v * 255.0 if float(np.nanmax(v)) <= 1.0 else v


def image_stats(image: np.ndarray) -> dict:
    """{"mean": brightness, "std": contrast} of one frame as decoded (before preprocess),
    on a 0-255 grey scale. Pure; the trainer calls it on every training image."""
    v = _gray_view(image)
    return {"mean": float(v.mean()), "std": float(v.std())}


class StatRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float = Field(ge=0, le=255, allow_inf_nan=False)
    max: float = Field(ge=0, le=255, allow_inf_nan=False)
    mean: float = Field(ge=0, le=255, allow_inf_nan=False)
    std: float = Field(ge=0, le=255, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.mean <= self.max:
            raise ValueError("needs min <= mean <= max")
        return self


class InputStats(BaseModel):
    """The training images' statistics (bundle.json input_stats)."""
    model_config = ConfigDict(extra="allow", frozen=True)   # newer trainers may add fields
    version: Literal[1] = STATS_VERSION
    n: int = Field(ge=1)
    mean: StatRange
    std: StatRange


def summarize_stats(stats: Iterable[dict]) -> dict:
    """Many image_stats() results -> the bundle's input_stats object (JSON-ready)."""
    rows = list(stats)
    if not rows:
        raise ValueError("no image statistics to summarize")
    out: dict = {"version": STATS_VERSION, "n": len(rows)}
    for key in ("mean", "std"):
        a = np.array([float(r[key]) for r in rows], np.float64)
        out[key] = {"min": round(float(a.min()), 3), "max": round(float(a.max()), 3),
                    "mean": round(float(a.mean()), 3), "std": round(float(a.std()), 3)}
    return out


def parse_input_stats(raw) -> InputStats:
    if isinstance(raw, InputStats):
        return raw
    try:
        return InputStats.model_validate(raw)
    except ValidationError as e:
        raise StatsError("; ".join(f"{'.'.join(map(str, x['loc'])) or '(object)'}: {x['msg']}"
                                   for x in e.errors()[:3])) from None


@dataclass(frozen=True)
class FrameCheckSettings:
    enabled: bool = True
    uniform_std: float = 2.0        # grey-level std below which a frame is blank
    frozen_frames: int = 2          # this many identical frames in a row: frozen (0: off)
    stats: bool = True              # compare with the bundle's input_stats when it has them
    stats_sigmas: float = 4.0       # "far outside": beyond the training range by this many
                                    # training standard deviations (at least _FLOOR)


class FrameChecker:
    """Stateful (the frozen check remembers the last frame): one per capture thread."""

    def __init__(self, settings: FrameCheckSettings = FrameCheckSettings()):
        self.settings = settings
        self._prev: np.ndarray | None = None
        self._same = 1

    def check(self, image: np.ndarray, stats: InputStats | None = None) -> str | None:
        """None when the frame looks like something; else '<reason>: <why>'."""
        found = self.find(image, stats)
        return None if found is None else found[1]

    def find(self, image: np.ndarray,
             stats: InputStats | None = None) -> tuple[FailsafeReason, str] | None:
        """None when the frame looks like something; else (reason, '<reason>: <why>')."""
        s = self.settings
        if not s.enabled or image is None:
            return None
        if s.frozen_frames >= 2:
            frozen = self._frozen(image)
            if frozen:
                return FROZEN, frozen
        try:
            st = image_stats(image)
        except ValueError:
            return None                 # preprocess refuses it with its own reason
        uniform = s.uniform_std
        if stats is not None and s.stats:
            # a training set of near-plain parts must not be called blank
            uniform = min(uniform, stats.std.min / 2)
        if st["std"] < uniform:
            return BLANK, (f"{BLANK}: near-uniform frame (brightness {st['mean']:.0f}, "
                           f"contrast {st['std']:.2f} < {uniform:.2f}): lens capped, light "
                           "off or camera dark?")
        if stats is not None and s.stats:
            for key, what in (("mean", "brightness"), ("std", "contrast")):
                r: StatRange = getattr(stats, key)
                margin = max(s.stats_sigmas * r.std, _FLOOR[key])
                lo, hi = r.min - margin, r.max + margin
                if not lo <= st[key] <= hi:
                    return OUT_OF_RANGE, (
                        f"{OUT_OF_RANGE}: {what} {st[key]:.1f} is far outside the training "
                        f"images' {r.min:.1f}..{r.max:.1f} (allowed {max(lo, 0):.1f}.."
                        f"{hi:.1f})")
        return None

    def _frozen(self, image: np.ndarray) -> str | None:
        prev, self._prev = self._prev, image
        same = (prev is not None and prev.shape == image.shape and prev.dtype == image.dtype
                and np.array_equal(prev[::17, ::13], image[::17, ::13])
                and np.array_equal(prev, image))
        self._same = self._same + 1 if same else 1
        if self._same >= self.settings.frozen_frames:
            return (f"{FROZEN}: {self._same} identical frames in a row: the camera is not "
                    "delivering new images")
        return None


__all__ = ["image_stats", "summarize_stats", "parse_input_stats", "InputStats", "StatsError",
           "FrameChecker", "FrameCheckSettings", "REASONS", "BLANK", "FROZEN", "OUT_OF_RANGE"]
