"""Frames to parts: the PartSelector stage between capture and inspect.

A camera gives frames; a line has parts (docs/design.md, "Frames and parts"). One selector
per trigger mode, each in its own module:

    agent/runtime/selector.py            Part, the selector base, mode "frame" (every frame a part)
    agent/runtime/external_selector.py   mode "external": a trigger picks the frame from a ring
    agent/runtime/presence_selector.py   mode "presence": parts detected and tracked in an ROI

    sel = make_selector(cfg.trigger)      # None for mode "frame": every frame is a part
    for part in sel.feed(captured): ...   # 0, 1 or more parts
    sel.trigger(t_ns, encoder)            # external mode, from any thread
    for part in sel.poll(now_ns): ...     # supervisor tick: triggers whose frame never came

Time is the capture clock (time.monotonic_ns): frames, triggers and crossings are compared
on it, so a wall-clock step (NTP) moves nothing here.
"""

from __future__ import annotations

from agent.runtime.external_selector import MISSED_TRIGGER, NO_FRAME_FOR_TRIGGER, ExternalSelector
from agent.runtime.presence_selector import PART_NOT_JUDGED, PART_STOPPED, TOUCHING, PresenceSelector
from agent.runtime.selector import FrameSelector, Part, SelectorBase

# the FAILSAFE reasons a selector gives (agent.types.FailsafeReason members)
REASONS = (NO_FRAME_FOR_TRIGGER, MISSED_TRIGGER, PART_NOT_JUDGED, PART_STOPPED, TOUCHING)


def make_selector(trigger) -> ExternalSelector | PresenceSelector | None:
    """The selector for a config's [trigger]; None for mode 'frame' (every frame a part)."""
    if trigger is None or trigger.mode == "frame":
        return None
    if trigger.mode == "external":
        return ExternalSelector(trigger.offset_ms, trigger.window_ms, trigger.ring_frames,
                                trigger.debounce_ms, trigger.max_pending)
    return PresenceSelector(trigger.roi, trigger.direction, trigger.line, trigger.threshold,
                            trigger.min_length, trigger.min_area, trigger.learn_frames,
                            trigger.adapt, trigger.judge, trigger.stop_ms, trigger.max_missed,
                            trigger.scale, trigger.crop_margin)


__all__ = ["Part", "SelectorBase", "FrameSelector", "ExternalSelector", "PresenceSelector",
           "make_selector", "REASONS", "NO_FRAME_FOR_TRIGGER", "MISSED_TRIGGER",
           "PART_NOT_JUDGED", "PART_STOPPED", "TOUCHING"]
