"""The reporter: turns each Inspection into MQTT events and a recorder entry (output thread).

Every rejected or FAILSAFE part becomes a durable alert on <prefix>/<station>/events/reject
(through firmware_io's MqttLink and its SQLite outbox); passes go to events/result when
publish_results is on. The payload is `event_payload()`; see docs/agent.md for the fields.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Callable

from agent.report.recorder import Recorder
from agent.types import Inspection, Verdict

log = logging.getLogger("reporter")


def _r(x: float, nd: int = 3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def event_payload(insp: Inspection, station: str, failsafe_policy: str = "reject",
                  image_path: str | None = None) -> dict:
    if insp.action is not None:
        action = insp.action.value           # what the pipeline's actuator told the gate
    else:                                    # a record built by hand: the policy says
        action = "reject" if insp.verdict is Verdict.REJECT or (
            insp.verdict is Verdict.FAILSAFE and failsafe_policy == "reject") else "pass"
    return {
        "part": insp.part_id,
        "station": station,
        "seq": insp.seq,
        "source_ref": insp.source_ref,
        "t_capture": round(insp.t_wall, 6),
        "verdict": insp.verdict.value,
        "action": action,
        "label": insp.label,
        "score": _r(insp.score, 5),
        "threshold": insp.threshold,
        "reason": insp.reason,
        "model_sha256": insp.model_sha256,
        "latency_ms": _r(insp.latency_ms),
        "timings": {k: round(v, 3) for k, v in insp.timings_ms.items()},
        # commanded: the gate was sent the kick. Whether it carried it out is only known
        # later: a follow-up events/reject_failed names every part it did not kick.
        "gate": {"target": insp.gate_target, "late": insp.gate_late, "error": insp.gate_error,
                 "commanded": action == "reject" and insp.gate_error is None
                 and bool(insp.gate_target)},
        "encoder": insp.encoder,
        "image_path": image_path,
    }


class Reporter:
    """A pipeline sink. `link` is a firmware_io MqttLink (or None: no MQTT)."""

    def __init__(self, station: str, link=None, recorder: Recorder | None = None,
                 failsafe_policy: str = "reject",
                 on_event: Callable[[dict], None] | None = None):
        self.station = station
        self.link = link
        self.recorder = recorder
        self.failsafe_policy = failsafe_policy
        self.on_event = on_event
        self.alerts = 0
        self.results = 0
        self.errors = 0
        self.alerts_dropped: collections.Counter = collections.Counter()
        self.publish_results = bool(link is not None and getattr(link.settings, "publish_results",
                                                                 False))

    def commit(self, insp: Inspection) -> None:
        """Pipeline.on_decided (inspect thread, right after the gate command): commit an
        alert to the outbox now, so a kill -9 cannot lose the alert of a part the gate was
        told to kick while its record waited for the output thread. A failure here is left
        to __call__, which tries again and counts it."""
        if self.link is None or insp.verdict is Verdict.PASS:
            return
        path = self.recorder.want(insp) if self.recorder is not None else None
        payload = event_payload(insp, self.station, self.failsafe_policy, path)
        try:
            self.link.publish_alert(payload)
        except Exception as e:  # noqa: BLE001
            log.debug("part %s: early alert commit failed (%s); output thread retries",
                      insp.part_id, e)
            return
        insp.image_path = path
        insp.alert = payload

    def __call__(self, insp: Inspection) -> None:
        if insp.alert is not None:          # committed in the inspect thread already
            if insp.image_path is not None:
                self.recorder.put(insp.image_path, insp.image, insp.alert, insp.defect_map)
            self.alerts += 1
            if self.on_event is not None:
                self.on_event(insp.alert)
            return
        path = self.recorder.want(insp) if self.recorder is not None else None
        alert = insp.verdict is not Verdict.PASS
        if not (alert or path or self.publish_results or self.on_event):
            return
        payload = event_payload(insp, self.station, self.failsafe_policy, path)
        if path is not None:
            self.recorder.put(path, insp.image, payload, insp.defect_map)
        if self.link is not None:
            try:
                if alert:
                    self.link.publish_alert(payload)
                    self.alerts += 1
                elif self.publish_results:
                    self.link.publish_result(payload)
                    self.results += 1
            except Exception as e:  # noqa: BLE001 - e.g. outbox full/disk error: log, count
                self.errors += 1
                if alert:
                    # a lost alert: counted by reason, in Prometheus, metrics and status
                    full = type(e).__name__ == "OutboxFull"
                    self.alerts_dropped["disk_full" if full else "error"] += 1
                # loud, but a full disk must not also flood the journal at line rate
                if self.errors <= 10 or self.errors % 100 == 0:
                    log.error("part %s: MQTT event NOT stored (%d so far): %s", insp.part_id,
                              self.errors, e)
        if self.on_event is not None:
            self.on_event(payload)
