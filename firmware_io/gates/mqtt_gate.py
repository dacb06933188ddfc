"""The MQTT gate: a relay/PLC that subscribes to ``<prefix>/<station>/gate/<gate>/reject``.

The host cannot rely on the relay to schedule from a delay over a network of unknown
latency, so the command carries an absolute wall-clock time, ``fire_at_epoch_ms`` (the PLC
keeps NTP/PTP time); late commands carry a time already past and mean "fire now".
Payload schema: firmware_io/schemas/gate_reject.json.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

from pydantic import Field

from ..timing import compute_target
from .base import Gate, GateConfig, GateOutcome


class MqttGateConfig(GateConfig):
    """``[gate] kind = "mqtt"``: a relay/PLC subscribed to the station's gate topic."""
    kind: Literal["mqtt"] = "mqtt"
    topic_name: Optional[str] = Field(None, min_length=1, pattern=r"^[^/#+\s]+$",
                                      description="the <gate> topic level; default the gate number")


class MqttGate(Gate):
    kind = "mqtt"
    config = MqttGateConfig
    settings: MqttGateConfig

    def __init__(self, settings: MqttGateConfig, link=None, **hooks):
        super().__init__(settings, link, **hooks)
        if link is None:
            raise ValueError("the mqtt gate needs an MqttLink (create_gate(..., link=link))")

    def open(self) -> None:
        pass

    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome:
        now_ns = time.monotonic_ns()
        wall_ms = time.time_ns() / 1e6
        target = compute_target(self.settings.timing, t_capture_ns, None, now_ns)
        if target.late:
            self._count("late")
        lead_ms = max(0.0, target.lead_ms)
        payload = {
            "part": part_id,
            "gate": gate,
            "fire_at_epoch_ms": int(round(wall_ms + lead_ms)),
            "pulse_ms": int(self.settings.timing.pulse_ms),
            "late": target.late,
            "sent_at_epoch_ms": int(wall_ms),
        }
        name = self.settings.topic_name or str(gate)
        if not self.link.connected():
            # a kick that reaches the PLC seconds later would hit another part: don't queue
            self._count("dropped_down")
            return GateOutcome(part_id, False, target.late, target.at, "mqtt link down")
        try:
            self.link.publish_raw(f"gate/{name}/reject", payload, qos=1)
        except Exception as exc:       # never let a reject raise into the pipeline
            self._count("errors")
            return GateOutcome(part_id, False, target.late, target.at, str(exc))
        self._count("sent")
        return GateOutcome(part_id, True, target.late, target.at)

    def state(self) -> str:
        return "connected" if self.link.connected() else "down"

    def close(self) -> None:
        pass
