"""Agent: one running station, the composition root of the inspection daemon.

It builds the parts from one Config in named steps (start: init_* then start_*), wires
their hooks, hands a reload's new settings to each part, and closes them in order. The
pieces with a job of their own live beside it: agent/commands/run.py (`edge-inspect run`),
agent/commands/supervisor.py (the main thread's loop), agent/commands/agent_commands.py (the command table),
agent/commands/agent_status.py (health, status, metrics), agent/commands/reload.py (what a reload changes,
and how it is handed over). Also used in-process by the demo, the tests and the benchmarks:

    agent = Agent(cfg, config_path="config.toml")
    agent.start()               # raises StartupError with one line per problem
    code = agent.run()          # until SIGTERM / request_stop() / the source ends
"""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from agent.commands.agent_commands import CommandDispatcher
from agent.commands.agent_status import StatusReport
from agent.config import Config
from agent.frame_checks import FrameChecker
from agent.runtime.inspector import Inspector, InspectorError
from agent.report.kicks import KickLedger
from agent.report.notify import Notifier, Watchdog
from agent.runtime.parts import make_selector
from agent.runtime.pipeline import Pipeline
from agent.report.prom import PromMetrics
from agent.report.recorder import Recorder
from agent.report.reporter import Reporter
from agent.commands.reload import Reloads
from agent.runtime.sources import open_source
from agent.commands.supervisor import Supervisor
from agent.types import Inspection, Verdict

log = logging.getLogger("daemon")


def main(argv: list[str]) -> int:
    """`edge-inspect run` (agent/commands/run.py), for callers of agent.commands.daemon:main."""
    from agent.commands.run import main as run_main

    return run_main(argv)


class StartupError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Agent(StatusReport, Reloads):
    """One running station. Keyword hooks are for the demo, tests and benchmarks:

    engine_wrap   callable(Engine) -> Engine, e.g. a slow or failing wrapper
    source        a ready Source instead of the one cfg.camera.source names
    sinks         extra callables(Inspection) in the output thread (live printing)
    on_fired      callable(part, gate, t_ms) for FIRED reports from a serial gate
    on_drained    callable() after the last part's gate command, before the gate and
                  the MQTT link close (the demo waits there for the last FIRED reports)
    notifier      an agent.report.notify.Notifier (default: from the environment)
    """

    def __init__(self, cfg: Config, *, config_path: str | Path | None = None,
                 engine_wrap: Callable | None = None, source=None,
                 sinks: tuple[Callable[[Inspection], None], ...] = (),
                 on_fired: Callable[[str, int, int], None] | None = None,
                 notifier=None, ready_timeout_s: float = 30.0,
                 status_interval_s: float = 5.0, gate_wait_s: float = 3.0,
                 on_drained: Callable[[], None] | None = None):
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.engine_wrap = engine_wrap
        self._source_override = source
        self._extra_sinks = tuple(sinks)
        self._on_fired_cb = on_fired
        self.notifier = notifier if notifier is not None else Notifier(os.environ)
        self.ready_timeout_s = ready_timeout_s
        self.gate_wait_s = gate_wait_s
        self.on_drained = on_drained
        self.status_interval_s = status_interval_s
        self.inspector: Inspector | None = None
        self.pipeline: Pipeline | None = None
        self.gate = None
        self.link = None
        self.recorder: Recorder | None = None
        self.reporter: Reporter | None = None
        self.prom = PromMetrics()
        self.watchdog = None
        self.ui = None          # agent/ui: the operator page's server, when [ui] port is set
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._reload_lock = threading.Lock()
        self.ready = False
        self.state = "starting"
        self.last_reload: dict | None = None
        self.fired = 0
        self.kicks = KickLedger(on_count=lambda f: self.prom.kick_failed(f.kind, f.immediate))
        self.command = CommandDispatcher(self)      # (verb, args) -> reply
        self._t_start = time.monotonic()

    # -- building ------------------------------------------------------------------------
    def start(self) -> "Agent":
        self._init_inspector()
        self._init_metrics()
        try:
            self._init_link()
            self._init_recorder()
            self._init_reporter()
            self._init_gate()
            ui_state = self._init_ui_state()
            self._init_pipeline(self._init_source(), ui_state)
            if ui_state is not None:
                self._start_ui(ui_state)
            self.pipeline.start()
            self._start_trigger_source()
            self.watchdog.start()
        except BaseException:
            self.close()
            raise
        return self

    def _init_inspector(self) -> None:
        try:
            self.inspector = Inspector.from_config(self.cfg, wrap=self.engine_wrap)
        except InspectorError as e:
            raise StartupError([f"model.bundle: {e}"]) from None
        log.info("model: %s", self.inspector.describe())
        self.prom.set_model(self.inspector.info())

    def _init_metrics(self) -> None:
        m = self.cfg.metrics
        try:
            self.prom.serve(m.port, m.bind)
        except OSError as e:
            raise StartupError([f"metrics.port: cannot listen on {m.bind}:{m.port}: "
                                f"{e.strerror or e}"]) from None

    def _init_link(self) -> None:
        m = self.cfg.mqtt
        if not m.enabled:
            return
        from firmware_io.mqtt_link import MqttLink

        try:
            password = m.password()
        except OSError as e:
            raise StartupError([f"mqtt.password_file: {e}"]) from None
        m.outbox.parent.mkdir(parents=True, exist_ok=True)
        self.link = MqttLink(m, on_command=self.command, status_fields=self._status_fields,
                             station=self.cfg.station.id, password=password)
        try:
            self.link.start()
        except sqlite3.Error as e:
            raise StartupError([f"mqtt.outbox: {m.outbox}: {e}"]) from None
        except (ssl.SSLError, ValueError) as e:
            raise StartupError([f"mqtt.tls: cannot load ca_file/cert_file: {e}"]) from None

    def _init_recorder(self) -> None:
        r = self.cfg.recorder
        if r.enabled:
            # alerts first: no images while the outbox is short of disk
            hold = self.link.disk_full if self.link is not None else None
            self.recorder = Recorder(r.dir, r.max_mb, r.pass_sample, hold=hold,
                                     min_free_mb=r.min_free_mb).start()

    def _init_reporter(self) -> None:
        self.reporter = Reporter(self.cfg.station.id, self.link, self.recorder,
                                 self.cfg.inspection.failsafe)

    def _init_gate(self) -> None:
        from firmware_io.gates import create_gate

        g = self.cfg.gate
        self.gate = create_gate(g, link=self.link, on_trigger=self._on_trigger,
                                on_fired=self._on_fired, on_reject_failed=self._on_reject_failed)
        self._warn_missing_devices()
        self.gate.open()
        if g.kind != "none":
            # Give the gate controller a moment to answer HELLO before parts flow (if it
            # does not, rejects are counted as gate errors and the firmware's own
            # no-heartbeat fail-safe diverts everything meanwhile).
            t_end = time.monotonic() + self.gate_wait_s
            while self.gate.state() != "connected" and time.monotonic() < t_end:
                time.sleep(0.02)
            log.info("gate %s: %s", g.kind, self.gate.state())

    def _init_source(self):
        cam = self.cfg.camera
        source = self._source_override or open_source(
            cam.source, loop=cam.loop, width=cam.width, height=cam.height,
            read_timeout_s=cam.stall_timeout_s)
        self.watchdog = Watchdog(self.notifier, max(30.0, 3 * (cam.reconnect_max_s
                                                              + cam.stall_timeout_s)))
        return source

    def _init_ui_state(self):
        if not self.cfg.ui.port:
            return None
        from agent.report.ui import UiState

        return UiState(self.cfg.ui.rejects)

    def _init_pipeline(self, source, ui_state) -> None:
        cfg = self.cfg
        sinks = [self.reporter, self.prom, self._kick_sink, self._progress,
                 *self._extra_sinks, *([ui_state] if ui_state is not None else [])]
        self.pipeline = Pipeline(
            source, self.inspector, gate=self.gate, sinks=sinks,
            deadline_ms=cfg.inspection.deadline_ms, failsafe=cfg.inspection.failsafe,
            queue_size=cfg.inspection.queue_size, gate_number=cfg.gate.gate,
            fps=cfg.camera.fps, reconnect_max_s=cfg.camera.reconnect_max_s,
            stall_timeout_s=cfg.camera.stall_timeout_s, on_state=self._on_state,
            keep_images=self.recorder is not None or ui_state is not None,
            workers=cfg.model.workers, needs_encoder=cfg.gate.mode == "encoder",
            on_decided=self.reporter.commit, selector=make_selector(cfg.trigger))
        self.pipeline.frame_checks = FrameChecker(cfg.frame_checks.settings())
        log.info("part ids: %s-<seq>", self.pipeline.prefix)

    def _start_ui(self, ui_state) -> None:
        from agent.report.ui import build_server

        ui = self.cfg.ui
        try:
            self.ui = build_server(self, ui_state).start()
        except OSError as e:
            raise StartupError([f"ui.port: cannot listen on {ui.bind}:{ui.port}: "
                                f"{e.strerror or e}"]) from None
        except ValueError as e:
            raise StartupError([f"ui.token_file: {e}"]) from None
        log.info("operator page on http://%s:%d/ (%s%s)", ui.bind, self.ui.port,
                 "control on" if ui.control else "read-only",
                 ", token" if ui.token_file else "")

    # -- hooks ---------------------------------------------------------------------------
    def _progress(self, insp: Inspection) -> None:
        self.watchdog.progress()
        if not self.ready:
            self._wake.set()

    def _on_trigger(self, part: str, encoder: int) -> None:
        if self.pipeline is not None:
            self.pipeline.on_trigger(part, encoder)

    def _warn_missing_devices(self) -> None:
        # run --no-devices (the systemd unit): an unplugged device is waited for, not fatal
        src, port = self.cfg.camera.source, getattr(self.cfg.gate, "port", None)
        if isinstance(src, str) and src.startswith("/dev/") and not os.path.exists(src):
            log.warning("camera %s is not plugged in: starting degraded, waiting for it "
                        "(backoff up to %g s)", src, self.cfg.camera.reconnect_max_s)
        if self.cfg.gate.kind in ("serial", "modbus") and port and not os.path.exists(port):
            log.warning("gate adapter %s is not plugged in: starting degraded, waiting for it; "
                        "until then every kick is reported NOT kicked", port)

    def _on_reject_failed(self, part: str, reason: str) -> None:
        """The gate's later verdict on a kick (gate thread): it was not carried out."""
        self.kicks.failed(part, reason)
        self._wake.set()

    def _kick_sink(self, insp: Inspection) -> None:
        """Kicks that failed at once (gate down, not sent, no encoder count)."""
        if insp.gate_error is not None and (insp.verdict is Verdict.REJECT or (
                insp.verdict is Verdict.FAILSAFE and self.cfg.inspection.failsafe == "reject")):
            self.kicks.failed(insp.part_id, insp.gate_error, immediate=True)
            self._wake.set()

    def _on_fired(self, part: str, gate: int, t_ms: int) -> None:
        self.fired += 1
        if self._on_fired_cb is not None:
            self._on_fired_cb(part, gate, t_ms)

    def _on_state(self, component: str, state: str, reason: str) -> None:
        self._wake.set()

    # -- commands and reload -------------------------------------------------------------
    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def take_reload_request(self) -> bool:
        requested, self._reload_requested = self._reload_requested, False
        return requested

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_for_news(self, timeout_s: float) -> None:
        """Until a hook has news (a part, a state change, a failed kick, a signal)."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    # -- the supervising loop ------------------------------------------------------------
    def run(self) -> int:
        """Supervise until stopped or the source ends; then drain and close. Exit code."""
        return Supervisor(self).run()

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """STOPPING; finish every part in flight (gate + reports), then close everything."""
        if self.pipeline is not None and not getattr(self, "_shut", False):
            self._shut = True
            self.notifier.stopping()
            t = time.monotonic()
            drained = self.pipeline.stop(drain_timeout)
            s = self.pipeline.snapshot()
            log.info("stopped: %s parts (%s pass, %s reject, %s failsafe) in flight drained %s "
                     "in %.0f ms", s.parts, s.passed, s.rejected, s.failsafe,
                     "fully" if drained else "NOT fully", (time.monotonic() - t) * 1e3)
            # the last reject commands: give the gate time to answer them (serial: every
            # resend; a host-scheduled Modbus kick waits in gate.close() until it is due)
            g = self.cfg.gate
            if self.gate is not None and g.kind == "serial":
                t_end = time.monotonic() + max(1.0, g.ack_timeout_ms * (g.retries + 1) / 1e3
                                               + 0.5)
                while self.gate.counters().get("pending", 0) and time.monotonic() < t_end:
                    time.sleep(0.01)
            if self.on_drained is not None:
                try:
                    self.on_drained()
                except Exception:  # noqa: BLE001
                    log.exception("on_drained hook failed")
            if self.link is not None:
                self.link.publish_metrics(self.metrics_payload())
        self.close()

    def _start_trigger_source(self) -> None:
        # external mode over MQTT: its own subscriber, so a trigger never waits on alerts
        t = self.cfg.trigger
        if t.mode != "external" or t.source != "mqtt":
            return
        from agent.runtime.trigger_sources import MqttTrigger

        m = self.cfg.mqtt
        password = m.password()
        self.trigger_source = MqttTrigger(
            m.host, m.port, f"{m.prefix}/{self.cfg.station.id}/trigger",
            lambda name, t_ns, enc: self.pipeline.part_trigger(name, t_ns, enc),
            username=m.username, password=password, tls=m.tls,
            ca_file=str(m.ca_file) if m.ca_file else None).start()

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if getattr(self, "trigger_source", None) is not None:
            self.trigger_source.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.recorder is not None:
            self.recorder.stop()
        # The gate before the link: closing it fires (Modbus) or fails (serial, no ACK yet)
        # the last kicks, and those outcomes must still reach the outbox.
        if self.gate is not None:
            try:
                self.gate.close()
            except Exception:  # noqa: BLE001
                log.exception("gate close failed")
        self.kicks.drain(self.link)
        if self.link is not None:
            if self.link.outbox_depth() and self.link.connected():
                self.link.wait_drained(2.0)
            self.link.stop()
        if self.ui is not None:
            self.ui.stop()
        self.prom.close()

