"""The old flat ``GateSettings`` ("everything any backend needs"), kept only for its last
caller, agent/bench.py (run_pipeline). Delete it, and create_gate's ``(kind, settings)``
form, when that builds ``create_gate(NoneGateConfig(delay_ms=deadline_ms * 4))`` instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..timing import RejectTiming


@dataclass
class GateSettings:
    port: str = "/dev/ttyUSB0"
    baud: int = 115200
    timing: RejectTiming = field(default_factory=RejectTiming)
    ack_timeout_ms: float = 100.0
    retries: int = 3
    heartbeat_ms: float = 500.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    slave_id: int = 1
    modbus_target: str = "coil"
    modbus_addresses: dict[int, int] = field(default_factory=lambda: {1: 0})
    on_trigger: Callable | None = None
    on_fired: Callable | None = None
    on_reject_failed: Callable | None = None

    def hooks(self) -> dict:
        return {"on_trigger": self.on_trigger, "on_fired": self.on_fired,
                "on_reject_failed": self.on_reject_failed}

    def to_config(self, cls):
        t = self.timing
        keys = {"delay_ms": t.delay_ms or None, "pulse_ms": t.pulse_ms,
                "encoder_offset": t.encoder_offset if t.mode == "encoder" else None,
                "port": self.port, "baud": self.baud, "ack_timeout_ms": self.ack_timeout_ms,
                "retries": self.retries, "heartbeat_ms": self.heartbeat_ms,
                "reconnect_min_s": self.reconnect_min_s, "reconnect_max_s": self.reconnect_max_s,
                "modbus_slave": self.slave_id, "modbus_target": self.modbus_target,
                "modbus_addresses": self.modbus_addresses}
        # the old settings were never checked across fields (a gate without a delay was legal)
        return cls.model_validate({k: v for k, v in keys.items() if k in cls.model_fields},
                                  context={"defer_checks": True})
