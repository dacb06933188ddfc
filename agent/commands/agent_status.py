"""What a running station says about itself: health, the overall state, the status line
(systemd STATUS, logs), the retained MQTT status and the metrics payload.

A mixin of Agent (agent/commands/daemon.py): it reads the agent's parts (pipeline, gate, link,
kicks, recorder, reporter) and changes nothing in them.
"""

from __future__ import annotations

import logging

from agent import __version__

log = logging.getLogger("daemon")


class StatusReport:
    def _status_fields(self) -> dict:
        insp = self.pipeline.inspector if self.pipeline else self.inspector
        out = {"version": __version__, "state_detail": self.health()}
        if insp is not None:
            out.update(model_sha256=insp.model_sha256, model=insp.bundle.name,
                       threshold=insp.threshold)
        if self.last_reload:
            out["last_reload"] = self.last_reload
        return out

    def health(self) -> dict:
        p = self.pipeline
        return {
            "source": p.source_state if p else "starting",
            "source_reason": p.source_reason if p else "",
            "gate": self.gate.state() if self.gate is not None else "none",
            "mqtt": self.link.state() if self.link is not None else "off",
            "paused": bool(p and p.paused),
            "kicks_failed": self.kicks.total,
            "kick_failing": self.kicks.active(),
        }

    def overall_state(self) -> str:
        h = self.health()
        if h["paused"]:
            return "paused"
        # mqtt down/refused: alerts pile up in the outbox and nobody sees them
        if h["source"] == "degraded" or h["gate"] in ("degraded", "down") \
                or h["mqtt"] in ("down", "refused") or h["kick_failing"]:
            return "degraded"
        if self.alerts_at_risk():
            return "degraded"
        return "online"

    def alerts_dropped(self) -> dict[str, int]:
        """Alerts not stored for delivery, by reason (reporter: disk_full/error; outbox:
        outbox_max, the oldest deleted past mqtt.outbox_max)."""
        out = dict(self.reporter.alerts_dropped) if self.reporter is not None else {}
        if self.link is not None:
            out["outbox_max"] = self.link.alerts_dropped()["outbox_max"]
        return out

    def alerts_at_risk(self) -> bool:
        # an alert was lost, or the outbox is on its disk reserve: someone must look
        return bool(sum(self.alerts_dropped().values())) or bool(
            self.link is not None and self.link.disk_full())

    def status_line(self) -> str:
        s = self.pipeline.snapshot()
        h = self.health()
        src = h["source"] + (f" ({h['source_reason']})" if h["source"] == "degraded" else "")
        return (f"{self.overall_state()}: {s.rate:.1f} parts/s, {s.parts} parts, "
                f"{s.rejected} rejects, {s.failsafe} failsafe, {h['kicks_failed']} kicks "
                f"failed, p99 {s.latency_ms.p99 or 0:.1f} ms; source {src}, gate "
                f"{h['gate']}, mqtt {h['mqtt']}; trigger {s.mode}")

    def metrics_payload(self) -> dict:
        p = self.pipeline
        out = p.snapshot().as_dict()
        out["state"] = self.overall_state()
        out["threshold"] = p.inspector.threshold
        out["model_sha256"] = p.inspector.model_sha256
        gc = self.gate.counters() if self.gate is not None else {}
        if self.gate is not None:
            out["gate"] = {"state": self.gate.state(), **gc}
        out["kicks"] = {"commanded": gc.get("sent", 0), "fired": self.fired,
                        **self.kicks.counters()}
        if self.recorder is not None:
            out["recorder"] = self.recorder.counters()
        if self.link is not None:
            out["outbox_depth"] = self.link.outbox_depth()
            out["outbox_disk_full"] = self.link.disk_full()
        out["alerts_dropped"] = self.alerts_dropped()
        return out

    def publish_status(self) -> None:
        if self.link is not None:
            try:
                self.link.publish_status(self.overall_state())
            except Exception:  # noqa: BLE001
                log.exception("status publish failed")

    def _update_prom(self) -> None:
        h = self.health()
        self.prom.update(stats=self.pipeline.snapshot(), gate=h["gate"], mqtt=h["mqtt"],
                         outbox=self.link.outbox_depth() if self.link is not None else None,
                         recorder=self.recorder.counters() if self.recorder else None)
        self.prom.set_alerts(self.alerts_dropped(),
                             self.link.disk_full() if self.link is not None else False)
