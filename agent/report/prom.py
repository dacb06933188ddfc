"""Prometheus metrics, one CollectorRegistry per daemon instance (tests can run several).

Metric names (all prefixed edge_inspect_): see docs/agent.md.
"""

from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from agent.runtime.stats import STAGES, PipelineStats
from agent.types import FailsafeReason, Inspection

log = logging.getLogger("metrics")

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5)


class PromMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.frames = Counter("edge_inspect_frames", "Parts (frames) handled", registry=r)
        self.verdicts = Counter("edge_inspect_verdicts", "Parts by verdict", ["verdict"],
                                registry=r)
        self.failsafes = Counter("edge_inspect_failsafes", "FAILSAFE parts by reason",
                                 ["reason"], registry=r)
        self.stage = Histogram("edge_inspect_stage_seconds",
                               "Per-stage time of each part (total = capture to gate command)",
                               ["stage"], buckets=_BUCKETS, registry=r)
        self.score = Histogram("edge_inspect_defect_score", "Defect score of inspected parts",
                               buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
                               registry=r)
        self.gate_errors = Counter("edge_inspect_gate_errors",
                                   "Reject commands the gate could not take (at once, or "
                                   "later: NAK, no ACK, lost, not fired)", registry=r)
        self.kicks_failed = Counter("edge_inspect_kicks_failed",
                                    "Parts whose kick was not carried out, by kind", ["reason"],
                                    registry=r)
        self.gate_late = Counter("edge_inspect_gate_late",
                                 "Reject commands sent with less lead than the gate needs",
                                 registry=r)
        self.queue_depth = Gauge("edge_inspect_queue_depth", "Items waiting per queue",
                                 ["queue"], registry=r)
        self.gate_state = Enum("edge_inspect_gate_state", "Reject gate link state",
                               states=["connected", "degraded", "down"], registry=r)
        self.source_state = Enum("edge_inspect_source_state", "Camera/source state",
                                 states=["starting", "connected", "degraded", "ended"],
                                 registry=r)
        self.mqtt_state = Enum("edge_inspect_mqtt_state", "MQTT link state",
                               states=["connected", "connecting", "down", "refused", "stopped",
                                       "off"], registry=r)
        self.outbox_depth = Gauge("edge_inspect_mqtt_outbox_depth",
                                  "Alerts waiting for the broker's PUBACK", registry=r)
        self.paused = Gauge("edge_inspect_paused", "1 while inspection is paused", registry=r)
        self.threshold = Gauge("edge_inspect_threshold", "Decision threshold in use", registry=r)
        self.model = Info("edge_inspect_model", "The model bundle in use", registry=r)
        self.reloads = Counter("edge_inspect_reloads", "Config/model reloads by result",
                               ["result"], registry=r)
        self.recorder_saved = Counter("edge_inspect_recorder_saved",
                                      "Images saved for retraining", registry=r)
        self.recorder_dropped = Counter("edge_inspect_recorder_dropped",
                                        "Images not saved, by reason", ["reason"], registry=r)
        self.recorder_bytes = Gauge("edge_inspect_recorder_bytes", "Bytes under the recorder dir",
                                    registry=r)
        self.reports_dropped = Counter("edge_inspect_reports_dropped",
                                       "Part records the output stage could not take", registry=r)
        self.alerts_dropped = Counter("edge_inspect_alerts_dropped",
                                      "Alerts NOT stored for delivery, by reason (disk_full, "
                                      "outbox_max: oldest deleted past mqtt.outbox_max, error)",
                                      ["reason"], registry=r)
        self.outbox_disk_full = Gauge("edge_inspect_outbox_disk_full",
                                      "1 while the alert outbox has hit a full disk (running on "
                                      "its reserve, or past it)", registry=r)
        self.trigger_mode = Enum("edge_inspect_trigger_mode", "How frames become parts "
                                 "([trigger] mode)", states=["frame", "external", "presence"],
                                 registry=r)
        self.selector = Counter("edge_inspect_selector",
                                "Part selector counters by trigger mode (frames, parts, "
                                "triggers, trigger_debounced, missed_trigger, "
                                "no_frame_for_trigger, part_not_judged, part_stopped, "
                                "touching_parts, debris, ...)", ["mode", "event"], registry=r)
        self._stages = {s: self.stage.labels(s) for s in STAGES}
        self._verdicts = {v: self.verdicts.labels(v) for v in ("PASS", "REJECT", "FAILSAFE")}
        self._failsafes = {f: self.failsafes.labels(f.value) for f in FailsafeReason}
        self._rec_prev: dict[str, float] = {}
        self._server = None

    # -- the per-part sink (output thread) -----------------------------------------------
    def __call__(self, insp: Inspection) -> None:
        self.frames.inc()
        self._verdicts[insp.verdict.value].inc()
        if insp.failsafe_reason is not None:
            self._failsafes[insp.failsafe_reason].inc()
        stages = self._stages
        for k, v in insp.timings_ms.items():
            h = stages.get(k)
            if h is not None:
                h.observe(v / 1000.0)
        if not math.isnan(insp.score):
            self.score.observe(insp.score)
        if insp.gate_error is not None:
            self.gate_errors.inc()
        if insp.gate_late:
            self.gate_late.inc()

    def kick_failed(self, kind: str, immediate: bool) -> None:
        """A kick that failed (agent.report.kicks). Immediate failures were already counted as
        gate errors from the part's record; the gate's later verdicts are counted here."""
        self.kicks_failed.labels(kind).inc()
        if not immediate:
            self.gate_errors.inc()

    # -- periodic ------------------------------------------------------------------------
    def set_model(self, info: dict) -> None:
        self.model.info({k: str(v) for k, v in info.items()})
        self.threshold.set(float(info.get("threshold", math.nan)))

    def update(self, *, queues: dict | None = None, gate: str | None = None,
               source: str | None = None, mqtt: str | None = None,
               outbox: int | None = None, paused: bool | None = None,
               recorder: dict | None = None, mode: str | None = None,
               selector: dict | None = None, stats: PipelineStats | None = None) -> None:
        """The periodic gauges. `stats` (Pipeline.snapshot()) supplies queues, source,
        paused, mode and selector, the same numbers the status line and MQTT metrics show;
        a keyword given as well wins."""
        if stats is not None:
            queues = stats.queues if queues is None else queues
            source = stats.source if source is None else source
            paused = stats.paused if paused is None else paused
            mode = stats.mode if mode is None else mode
            selector = stats.selector if selector is None else selector
        for q, n in (queues or {}).items():
            self.queue_depth.labels(q).set(n)
        if gate in ("connected", "degraded", "down"):
            self.gate_state.state(gate)
        if source in ("starting", "connected", "degraded", "ended"):
            self.source_state.state(source)
        if mqtt in ("connected", "connecting", "down", "refused", "stopped", "off"):
            self.mqtt_state.state(mqtt)
        if outbox is not None:
            self.outbox_depth.set(outbox)
        if paused is not None:
            self.paused.set(1 if paused else 0)
        if recorder:
            self._delta(self.recorder_saved, "saved", recorder.get("saved", 0))
            for reason, n in (recorder.get("dropped") or {}).items():
                self._delta(self.recorder_dropped.labels(reason), f"dropped:{reason}", n)
            self.recorder_bytes.set(recorder.get("bytes", 0))
        if mode in ("frame", "external", "presence"):
            self.trigger_mode.state(mode)
        for event, n in (selector or {}).items():
            m = mode or "frame"
            self._delta(self.selector.labels(m, event), f"selector:{m}:{event}", n)

    def _delta(self, counter, key: str, total: float) -> None:
        prev = self._rec_prev.get(key, 0)
        if total > prev:
            counter.inc(total - prev)
        self._rec_prev[key] = total

    def set_alerts(self, dropped: dict[str, int], disk_full: bool) -> None:
        """Totals of alerts not stored, by reason (counters only ever grow)."""
        for reason, n in dropped.items():
            self._delta(self.alerts_dropped.labels(reason), f"alerts:{reason}", n)
        self.outbox_disk_full.set(1 if disk_full else 0)

    # -- HTTP endpoint -------------------------------------------------------------------
    def serve(self, port: int, bind: str = "127.0.0.1") -> None:
        """Serve /metrics on bind:port (raises OSError when the port is taken)."""
        if port:
            res = start_http_server(port, addr=bind, registry=self.registry)
            self._server = res[0] if isinstance(res, tuple) else None
            log.info("Prometheus metrics on http://%s:%d/metrics", bind, port)

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
