"""`[trigger]`: how frames become parts (docs/design.md, "Frames and parts").

One pydantic model per mode, joined as a union discriminated by `mode`, so a key that
belongs to another mode is an error ("trigger.roi: unknown key") rather than silently
ignored. `frame` is the default: every frame is a part, today's behaviour.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field, field_validator

from firmware_io.checked import Checked


class _Mode(Checked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FrameTrigger(_Mode):
    """Every frame is a part (an image folder, a hardware-triggered camera)."""
    mode: Literal["frame"] = "frame"

    def describe(self) -> str:
        return "frame (every frame is a part)"


class ExternalTrigger(_Mode):
    """A part-present signal picks the frame nearest trigger time + offset_ms."""
    mode: Literal["external"] = "external"
    # serial: the gate controller's TRG lines; mqtt: <prefix>/<station>/trigger;
    # modbus: a discrete input, polled and edge-detected
    source: Literal["serial", "mqtt", "modbus"] = "serial"
    offset_ms: float = Field(0.0, ge=0, le=10_000, description="sensor-to-camera travel")
    # The chosen frame must lie within this of trigger + offset, or the part is FAILSAFE
    # (no_frame_for_trigger). About one frame period at 30 fps, with a margin.
    window_ms: float = Field(40.0, gt=0, le=5_000)
    ring_frames: int = Field(32, ge=2, le=1024, description="frames kept to choose from")
    # A trigger storm (a bouncing sensor) is bounded: triggers closer than this to the
    # previous one are dropped and counted (trigger_debounced).
    debounce_ms: float = Field(5.0, ge=0, le=10_000)
    max_pending: int = Field(64, ge=1, le=10_000)
    modbus_input: int = Field(0, ge=0, le=65535, description="discrete input address")
    modbus_poll_ms: float = Field(2.0, gt=0, le=1000)

    def describe(self) -> str:
        src = {"serial": "gate TRG", "mqtt": "MQTT <prefix>/<station>/trigger",
               "modbus": f"Modbus discrete input {self.modbus_input} polled every "
                         f"{self.modbus_poll_ms:g} ms"}[self.source]
        return (f"external from {src}: frame nearest trigger + {self.offset_ms:g} ms "
                f"(within {self.window_ms:g} ms, ring {self.ring_frames})")


class PresenceTrigger(_Mode):
    """Software part detection on a free-running camera."""
    mode: Literal["presence"] = "presence"
    # x0, y0, x1, y1 as fractions of the frame; should hold at least two part lengths
    # along the belt so every part is wholly seen at the reference line.
    roi: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    direction: Literal["+x", "-x", "+y", "-y"] = "+x"
    # where along the ROI (0 = upstream edge, 1 = downstream) the crossing is timed
    line: float = Field(0.5, gt=0, lt=1)
    # grey levels above the learnt empty belt (after the lighting offset is removed)
    threshold: float = Field(30.0, gt=0, le=255)
    # parts shorter along the belt than this share of the ROI, or smaller in area, are debris
    min_length: float = Field(0.05, gt=0, lt=1)
    min_area: float = Field(0.01, gt=0, lt=1)
    learn_frames: int = Field(15, ge=1, le=10_000, description="empty-belt frames at start")
    adapt: float = Field(0.02, ge=0, le=0.5, description="background update rate")
    judge: Literal["centred", "worst"] = "centred"
    # a part that has not moved for this long is judged FAILSAFE (part_stopped) once
    stop_ms: float = Field(1000.0, gt=0, le=600_000)
    # frames a track may go unseen before it is given up (a dark part, a dropped frame)
    max_missed: int = Field(3, ge=0, le=100)
    # downscale factor for the detector: cost, not resolution, is what it needs
    scale: int = Field(4, ge=1, le=16)
    # the inspector judges only the part: its box on the chosen frame, grown by this share
    # of the box's size on each side (clamped to the frame), not the whole frame
    crop_margin: float = Field(0.05, ge=0, le=2)

    @field_validator("roi")
    @classmethod
    def _roi(cls, v):
        x0, y0, x1, y1 = v
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("roi is [x0, y0, x1, y1] as fractions of the frame, "
                             "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return v

    def checks(self):
        return [self._debris]

    def _debris(self):
        if self.min_length >= self.line:
            return "", (f"min_length {self.min_length:g} is not below line {self.line:g}: "
                        "no part could be seen before the line")

    def describe(self) -> str:
        return (f"presence in roi {list(self.roi)} moving {self.direction}, line at "
                f"{self.line:g}, threshold {self.threshold:g}, judged on the "
                f"{'best-centred frame' if self.judge == 'centred' else 'worst score'}")


TriggerConfig = Annotated[Union[FrameTrigger, ExternalTrigger, PresenceTrigger],
                          Field(discriminator="mode")]
TRIGGER_MODES: dict[str, type[_Mode]] = {"frame": FrameTrigger, "external": ExternalTrigger,
                                         "presence": PresenceTrigger}
