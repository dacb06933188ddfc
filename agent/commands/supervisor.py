"""The main thread of a running station: wait, react, report, until stopped.

Each wake-up (a part, a state change, a kick failure, a signal, or 0.25 s) runs the steps
in order: a requested reload, failed kicks to the outbox, READY once, the end of the
source, and three timers: the health tick (stall check, watchdog, Prometheus, status on
change), systemd STATUS, and MQTT metrics.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.commands.daemon import Agent

log = logging.getLogger("daemon")

TICK_S = 0.5


class Every:
    """Due now, then every ``period_s``."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.next = 0.0

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = now + self.period_s
        return True


class Supervisor:
    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.t_start = time.monotonic()
        self.tick = Every(TICK_S)
        self.status = Every(agent.status_interval_s)
        self.metrics = Every(agent.cfg.mqtt.metrics_interval_s)
        self.last_state: str | None = None
        self.last_detail: dict | None = None

    def run(self) -> int:
        """Supervise until stopped or the source ends; then drain and close. Exit code."""
        a = self.agent
        try:
            while not a.stopping():
                a.wait_for_news(0.25)
                if a.take_reload_request():
                    a.reload("SIGHUP")
                a.kicks.drain(a.link)
                now = time.monotonic()
                self._ready_once(now)
                if a.pipeline.finished:
                    self._log_end()
                    break
                if self.tick.due(now):
                    self._health_tick()
                if self.status.due(now):
                    a.notifier.status(a.status_line())
                if a.link is not None and self.metrics.due(now):
                    a.link.publish_metrics(a.metrics_payload())
        finally:
            a.shutdown()
        return 1 if a.pipeline.error else 0

    def _ready_once(self, now: float) -> None:
        a, p = self.agent, self.agent.pipeline
        # an unplugged camera: up and degraded, waiting for it (READY at once, so systemd
        # does not time the start out while the device is away)
        if not a.ready and (p.counts["parts"] > 0 or p.waiting_for_source or
                            now - self.t_start > a.ready_timeout_s or p.finished):
            a.ready = True
            a.notifier.ready(a.status_line())
            log.info("ready: %s", a.status_line())

    def _log_end(self) -> None:
        p = self.agent.pipeline
        if p.error:
            log.error("pipeline failed: %s", p.error)
        else:
            log.info("source ended: %s", p.source_reason or "done")

    def _health_tick(self) -> None:
        a, p = self.agent, self.agent.pipeline
        p.check_stall()
        if p.waiting_for_source:
            # reconnecting with backoff is alive, not hung: a restart would not bring the
            # camera back, and systemd's start limit would give up
            a.watchdog.progress()
        a._update_prom()
        state, detail = a.overall_state(), a.health()
        if state == self.last_state and detail == self.last_detail:
            return
        # the first state too when it is degraded: a source that fails before the first
        # tick must not start silently
        if state != self.last_state and (self.last_state is not None or state == "degraded"):
            log.log(logging.WARNING if state == "degraded" else logging.INFO,
                    "state %s -> %s (%s)", self.last_state or "starting", state, detail)
        self.last_state, self.last_detail = state, detail
        a.publish_status()
