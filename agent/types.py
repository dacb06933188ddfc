"""The typed records that flow one way through the daemon: Frame -> Inspection (and Box,
the part box a presence selector finds and the inspector is given the crop of), with the
closed vocabularies they carry: Verdict, FailsafeReason, Action."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Verdict(str, enum.Enum):
    PASS = "PASS"
    REJECT = "REJECT"
    # Could not be inspected in time, or inference failed: handled by the failsafe policy
    # (reject by default) and always counted and reported.
    FAILSAFE = "FAILSAFE"


class FailsafeReason(enum.StrEnum):
    """Why a part was FAILSAFE. The values are the wire format: the start of
    Inspection.reason, the Prometheus label `reason`, the keys of `failsafe_reasons`."""
    # the inspector's
    DEADLINE = "deadline"                 # could not be (or was not) decided before its deadline
    OVERLOAD = "overload"                 # live frame found the inspect queue full
    INFERENCE = "inference_error"         # the engine raised / gave garbage
    DECODE = "decode_error"               # a part was there but its image was unreadable
    PREPROCESS = "preprocess_error"       # the frame could not be fitted to the model input
    PAUSED = "paused"                     # paused by command: nothing passes uninspected
    NO_ENCODER = "no_encoder"             # encoder timing, but no TRG latched a count
    # agent.frame_checks: the frame showed nothing worth judging
    BLANK = "blank_frame"
    FROZEN = "frozen_frame"
    OUT_OF_RANGE = "frame_out_of_range"
    # agent.runtime.parts: the part selector's (trigger modes external and presence)
    NO_FRAME_FOR_TRIGGER = "no_frame_for_trigger"  # no frame within the window of trigger+offset
    MISSED_TRIGGER = "missed_trigger"              # more triggers pending than the bound (storm)
    PART_NOT_JUDGED = "part_not_judged"            # seen, but lost before its reference line
    PART_STOPPED = "part_stopped"                  # stopped on the belt before the line
    TOUCHING = "touching_parts"                    # two or more parts in one blob

    def text(self, detail: str | None = "") -> str:
        """Inspection.reason: the code, then the detail. Details that already start with
        the code (the selectors' and frame checks' log-line texts) are not prefixed twice."""
        if not detail:
            return self.value
        return detail if detail.startswith(self.value) else f"{self.value}: {detail}"


class Action(enum.StrEnum):
    """What the gate was told for a part (the event payload's `action`)."""
    REJECT = "reject"
    PASS = "pass"


@dataclass(frozen=True, slots=True)
class Box:
    """A part's box in frame pixels: columns [x0, x1), rows [y0, y1)."""
    x0: int
    y0: int
    x1: int
    y1: int

    def expand(self, margin: float, width: int, height: int) -> "Box":
        """Grown by `margin` of its own width/height on each side, clamped to the frame."""
        mx = int(round(margin * (self.x1 - self.x0)))
        my = int(round(margin * (self.y1 - self.y0)))
        x0, y0 = max(0, self.x0 - mx), max(0, self.y0 - my)
        return Box(x0, y0, max(x0 + 1, min(width, self.x1 + mx)),
                   max(y0 + 1, min(height, self.y1 + my)))

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The box's pixels (a view), clamped to the image."""
        h, w = image.shape[:2]
        x0, y0 = min(max(0, self.x0), w - 1), min(max(0, self.y0), h - 1)
        return image[y0:max(y0 + 1, min(h, self.y1)), x0:max(x0 + 1, min(w, self.x1))]


@dataclass(slots=True)
class Frame:
    seq: int
    part_id: str
    t_capture_ns: int          # time.monotonic_ns() at capture: deadlines and gate timing
    t_wall: float              # time.time() at capture: what humans and MQTT see
    image: np.ndarray          # as decoded by OpenCV (H, W) or (H, W, C)
    source_ref: str            # file name, or "<source>#<frame index>"
    encoder: int | None = None  # encoder count latched by a part-present trigger
    t_decoded_ns: int = 0
    # Set when a part was there but its image could not be read or decoded (a corrupt file
    # in a folder source): the part is FAILSAFE, never skipped.
    error: str | None = None


@dataclass(slots=True)
class Inspection:
    part_id: str
    seq: int
    source_ref: str
    t_capture_ns: int
    t_wall: float
    verdict: Verdict
    label: str
    score: float               # defect score in [0, 1]; NaN when not inspected
    threshold: float
    reason: str = ""           # why a FAILSAFE happened: FailsafeReason.text(detail)
    encoder: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None   # kept for the recorder; dropped after reporting
    model_sha256: str = ""
    latency_ms: float = float("nan")  # capture -> gate command (the decision acted on)
    gate_target: str = ""             # the gate command's target ("d612", "e1234"), if sent
    gate_late: bool = False
    gate_error: str | None = None
    image_path: str | None = None     # where the recorder was asked to save the image
    alert: dict | None = None         # the alert as committed to the outbox (inspect thread)
    # (h, w) float patch map of where the part looks defective: filled for REJECTs of an
    # engine that gives maps (anomaly bundles), after the gate command; None otherwise
    defect_map: np.ndarray | None = None
    # typed twins of `reason` and the payload's action: read these, never parse `reason`
    failsafe_reason: FailsafeReason | None = None
    action: Action | None = None      # None: not acted on by a pipeline (built by hand)

    @property
    def rejected(self) -> bool:
        return self.verdict is not Verdict.PASS
