"""The rules across sections of the config, one small function each.

Each rule reads the sections it needs from ``c`` (attributes station, camera, gate, …) and
returns ``(where, message)`` or None. A section that failed its own checks is None and a
key that failed is missing from its section, so a rule that reads either raises
AttributeError and is skipped (``run_rules``): a typo in one place never hides an
impossible combination elsewhere, and never produces a bogus one.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

Problem = tuple[str, str]
Rule = Callable[[object], Optional[Problem]]


def is_url(s: str) -> bool:
    """scheme://... (rtsp://, http://, spy://, socket://): a URL, not a path. The one definition."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I))


def run_checks(checks, partial: bool) -> list[Problem]:
    """Run each rule; one that reads a key that failed validation is skipped. With nothing
    failed (``partial`` False) an AttributeError is a bug, and is raised."""
    out = []
    for check in checks:
        try:
            p = check()
        except AttributeError:
            if not partial:
                raise
            continue
        if p is not None:
            out.append(p)
    return out


def _ui_token(c):
    ui = c.ui
    if ui.port and not ui.loopback and ui.token_file is None:
        return "ui.token_file", (f"the operator page is bound to {ui.bind}, beyond this box: "
                                 "it needs a token file (or bind = \"127.0.0.1\")")


def _ui_port(c):
    if c.ui.port and c.ui.port == c.metrics.port:
        return "ui.port", f"{c.ui.port} is also metrics.port"


def _workers_on_cpu(c):
    if c.model.workers > 1 and c.model.delegate != "cpu":
        return "model.workers", ("several inspect workers need delegate = 'cpu' "
                                 "(one Edge TPU serves one interpreter)")


def _mqtt_gate_needs_mqtt(c):
    if c.gate.kind == "mqtt" and not c.mqtt.enabled:
        return "gate.kind", "an mqtt gate needs [mqtt] enabled = true"


def _verdict_before_gate(c):
    g, insp = c.gate, c.inspection
    if g.delay_ms is not None and g.delay_ms <= insp.deadline_ms:
        return "gate.delay_ms", (f"{g.delay_ms:g} ms is not longer than inspection.deadline_ms "
                                 f"({insp.deadline_ms:g} ms): the part would reach the gate "
                                 "before its verdict")


def _trigger_clock(c):
    t = c.trigger
    if t.mode != "frame" and c.gate.mode == "encoder":
        return "trigger.mode", (f"{t.mode!r} times parts by clock; encoder timing "
                                "(gate.encoder_offset) latches a count per TRG frame: use "
                                "gate.delay_ms")


def _external(c):
    t = c.trigger
    return t if t.mode == "external" else None


def _trigger_serial(c):
    t = _external(c)
    if t is not None and t.source == "serial" and c.gate.kind != "serial":
        return "trigger.source", ("'serial' triggers come from the gate controller's TRG "
                                  f"(gate.kind = 'serial'), not {c.gate.kind!r}")


def _trigger_mqtt(c):
    t = _external(c)
    if t is not None and t.source == "mqtt" and not c.mqtt.enabled:
        return "trigger.source", "'mqtt' triggers need [mqtt] enabled = true"


def _trigger_modbus(c):
    t = _external(c)
    if t is not None and t.source == "modbus" and c.gate.kind != "modbus":
        return "trigger.source", ("'modbus' polls the Modbus gate's discrete input "
                                  "(gate.kind = 'modbus')")


def _trigger_in_deadline(c):
    t = _external(c)
    if t is not None and t.offset_ms + t.window_ms >= c.inspection.deadline_ms:
        return "trigger.offset_ms", (
            f"offset {t.offset_ms:g} + window {t.window_ms:g} ms is not inside "
            f"inspection.deadline_ms ({c.inspection.deadline_ms:g} ms): every part would be "
            "past its deadline before its frame arrives")


def _trigger_paced(c):
    t, src = c.trigger, c.camera.source
    if t.mode != "frame" and isinstance(src, str) and not src.startswith("/dev/") \
            and not is_url(src) and not src.isdigit() and not c.camera.fps:
        return "camera.fps", (f"trigger mode {t.mode!r} on a file or folder needs camera.fps "
                              "(frames paced as the camera would deliver them, so frame times "
                              "are line times)")


def _metrics_not_broker(c):
    m, metrics = c.mqtt, c.metrics
    if metrics.port and m.enabled and metrics.port == m.port and m.host in ("127.0.0.1",
                                                                           "localhost"):
        return "metrics.port", f"{metrics.port} is the local MQTT broker's port"


RULES: tuple[Rule, ...] = (
    _ui_token, _ui_port, _workers_on_cpu, _mqtt_gate_needs_mqtt, _verdict_before_gate,
    _trigger_clock, _trigger_serial, _trigger_mqtt, _trigger_modbus, _trigger_in_deadline,
    _trigger_paced, _metrics_not_broker,
)

# A problem that makes another moot: a gate delay inside the deadline must grow, and the
# resend arithmetic against today's delay would only be noise beside it.
SUPERSEDES = {"gate.delay_ms": "gate.retries"}
