"""`edge-inspect run --config FILE`: the inspection daemon.

Agent wires one Config into the running parts (also used in-process by the demo and the
tests): Inspector (verified bundle + engine), firmware_io gate and MQTT link, Pipeline,
Reporter, Recorder, Prometheus, systemd notify. The main thread only supervises: signals,
reloads, status/metrics publishing, READY/WATCHDOG/STATUS/STOPPING.

    agent = Agent(cfg, config_path="config.toml")
    agent.start()               # raises StartupError with one line per problem
    code = agent.run()          # until SIGTERM / request_stop() / the source ends
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .config import Config, ConfigError, config_warnings, load_config, print_problems
from .frame_checks import FrameChecker
from .inspector import Inspector, InspectorError
from .kicks import KickLedger
from .notify import Notifier, Watchdog
from .parts import make_selector
from .pipeline import Pipeline
from .prom import PromMetrics
from .recorder import Recorder
from .reporter import Reporter
from .sources import open_source
from .types import Inspection, Verdict

log = logging.getLogger("daemon")

class StartupError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def mqtt_settings(cfg: Config):
    """The old flat MQTT settings, for tests/test_disk_full.py until it builds
    MqttLink(cfg.mqtt, station=cfg.station.id) itself."""
    from firmware_io.mqtt_link import MqttSettings

    return MqttSettings(**cfg.mqtt.model_dump(), station=cfg.station.id)


# Sections whose change needs a restart (the rest is applied by a reload).
_RESTART_SECTIONS = ("station", "camera", "gate", "mqtt", "metrics", "ui", "trigger")


class Agent:
    """One running station. Keyword hooks are for the demo, tests and benchmarks:

    engine_wrap   callable(Engine) -> Engine, e.g. a slow or failing wrapper
    source        a ready Source instead of the one cfg.camera.source names
    sinks         extra callables(Inspection) in the output thread (live printing)
    on_fired      callable(part, gate, t_ms) for FIRED reports from a serial gate
    on_drained    callable() after the last part's gate command, before the gate and
                  the MQTT link close (the demo waits there for the last FIRED reports)
    notifier      an agent.notify.Notifier (default: from the environment)
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
        self._t_start = time.monotonic()

    # -- building ------------------------------------------------------------------------
    def start(self) -> "Agent":
        cfg = self.cfg
        try:
            self.inspector = Inspector.from_config(cfg, wrap=self.engine_wrap)
        except InspectorError as e:
            raise StartupError([f"model.bundle: {e}"]) from None
        log.info("model: %s", self.inspector.describe())
        self.prom.set_model(self.inspector.info())
        try:
            self.prom.serve(cfg.metrics.port, cfg.metrics.bind)
        except OSError as e:
            raise StartupError([f"metrics.port: cannot listen on {cfg.metrics.bind}:"
                                f"{cfg.metrics.port}: {e.strerror or e}"]) from None
        try:
            if cfg.mqtt.enabled:
                from firmware_io.mqtt_link import MqttLink

                try:
                    password = cfg.mqtt.password()
                except OSError as e:
                    raise StartupError([f"mqtt.password_file: {e}"]) from None
                cfg.mqtt.outbox.parent.mkdir(parents=True, exist_ok=True)
                self.link = MqttLink(cfg.mqtt, on_command=self.command,
                                     status_fields=self._status_fields,
                                     station=cfg.station.id, password=password)
                try:
                    self.link.start()
                except sqlite3.Error as e:
                    raise StartupError([f"mqtt.outbox: {cfg.mqtt.outbox}: {e}"]) from None
                except (ssl.SSLError, ValueError) as e:
                    raise StartupError([f"mqtt.tls: cannot load ca_file/cert_file: {e}"]) from None
            if cfg.recorder.enabled:
                # alerts first: no images while the outbox is short of disk
                hold = self.link.disk_full if self.link is not None else None
                self.recorder = Recorder(cfg.recorder.dir, cfg.recorder.max_mb,
                                         cfg.recorder.pass_sample, hold=hold,
                                         min_free_mb=cfg.recorder.min_free_mb).start()
            self.reporter = Reporter(cfg.station.id, self.link, self.recorder,
                                     cfg.inspection.failsafe)
            from firmware_io.gates import create_gate

            self.gate = create_gate(cfg.gate, link=self.link, on_trigger=self._on_trigger,
                                    on_fired=self._on_fired,
                                    on_reject_failed=self._on_reject_failed)
            self._warn_missing_devices()
            self.gate.open()
            if cfg.gate.kind != "none":
                # Give the gate controller a moment to answer HELLO before parts flow (if it
                # does not, rejects are counted as gate errors and the firmware's own
                # no-heartbeat fail-safe diverts everything meanwhile).
                t_end = time.monotonic() + self.gate_wait_s
                while self.gate.state() != "connected" and time.monotonic() < t_end:
                    time.sleep(0.02)
                log.info("gate %s: %s", cfg.gate.kind, self.gate.state())
            source = self._source_override or open_source(
                cfg.camera.source, loop=cfg.camera.loop, width=cfg.camera.width,
                height=cfg.camera.height, read_timeout_s=cfg.camera.stall_timeout_s)
            self.watchdog = Watchdog(self.notifier, max(30.0, 3 * (cfg.camera.reconnect_max_s
                                                                  + cfg.camera.stall_timeout_s)))
            ui_state = None
            if cfg.ui.port:
                from .ui import UiState

                ui_state = UiState(cfg.ui.rejects)
            sinks = [self.reporter, self.prom, self._kick_sink, self._progress,
                     *self._extra_sinks, *([ui_state] if ui_state is not None else [])]
            self.pipeline = Pipeline(
                source, self.inspector, gate=self.gate, sinks=sinks,
                deadline_ms=cfg.inspection.deadline_ms, failsafe=cfg.inspection.failsafe,
                queue_size=cfg.inspection.queue_size, gate_number=cfg.gate.gate,
                fps=cfg.camera.fps, reconnect_max_s=cfg.camera.reconnect_max_s,
                stall_timeout_s=cfg.camera.stall_timeout_s, on_state=self._on_state,
                keep_images=self.recorder is not None or ui_state is not None,
                workers=cfg.model.workers,
                needs_encoder=cfg.gate.mode == "encoder",
                on_decided=self.reporter.commit, selector=make_selector(cfg.trigger))
            self.pipeline.frame_checks = FrameChecker(cfg.frame_checks.settings())
            log.info("part ids: %s-<seq>", self.pipeline.prefix)
            if ui_state is not None:
                self._start_ui(ui_state)
            self.pipeline.start()
            self._start_trigger_source()
            self.watchdog.start()
        except BaseException:
            self.close()
            raise
        return self

    def _start_ui(self, ui_state) -> None:
        from .ui import build_server

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

    def _status_fields(self) -> dict:
        insp = self.pipeline.inspector if self.pipeline else self.inspector
        out = {"version": __version__, "state_detail": self.health()}
        if insp is not None:
            out.update(model_sha256=insp.model_sha256, model=insp.bundle.name,
                       threshold=insp.threshold)
        if self.last_reload:
            out["last_reload"] = self.last_reload
        return out

    # -- state ---------------------------------------------------------------------------
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
        p = self.pipeline
        s = p.stats()
        h = self.health()
        src = h["source"] + (f" ({h['source_reason']})" if h["source"] == "degraded" else "")
        return (f"{self.overall_state()}: {s['rate']:.1f} parts/s, {s['parts']} parts, "
                f"{s['reject']} rejects, {s['failsafe']} failsafe, {h['kicks_failed']} kicks "
                f"failed, p99 {s['latency_ms']['p99'] or 0:.1f} ms; source {src}, gate "
                f"{h['gate']}, mqtt {h['mqtt']}; trigger {s['mode']}")

    def metrics_payload(self) -> dict:
        p = self.pipeline
        out = p.stats()
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

    # -- commands and reload -------------------------------------------------------------
    def command(self, verb: str, args: dict) -> dict:
        """MQTT commands (already schema-checked by the link)."""
        p = self.pipeline
        if p is None:
            return {"ok": False, "error": "not running yet"}
        if verb == "pause":
            p.pause()
            log.warning("inspection PAUSED by command: every part is FAILSAFE (%s) until resume",
                        self.cfg.inspection.failsafe)
            self._publish_status()
            return {"ok": True, "paused": True}
        if verb == "resume":
            p.resume()
            log.info("inspection resumed by command")
            self._publish_status()
            return {"ok": True, "paused": False}
        if verb == "threshold":
            with self._reload_lock:
                old = p.inspector.threshold
                p.set_threshold(float(args["value"]))
            self.prom.set_model(p.inspector.info())
            log.info("threshold %g -> %g by command", old, p.inspector.threshold)
            self._publish_status()
            return {"ok": True, "threshold": p.inspector.threshold, "previous": old}
        if verb == "reload":
            return self.reload("mqtt")
        return {"ok": False, "error": f"unknown command {verb!r}"}

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def reload(self, origin: str = "SIGHUP") -> dict:
        """Re-read the config and the model; swap them in atomically, or refuse and keep
        the running ones. Returns {"ok": bool, ...} (also the MQTT reply)."""
        with self._reload_lock:
            self.notifier.reloading()
            old = self.pipeline.inspector
            try:
                new_cfg = load_config(self.config_path) if self.config_path else self.cfg
                new = Inspector.from_config(new_cfg, wrap=self.engine_wrap)
            except ConfigError as e:
                result = {"ok": False, "error": "config: " + "; ".join(e.problems)}
            except InspectorError as e:
                result = {"ok": False, "error": f"model: {e}"}
            except Exception as e:  # noqa: BLE001 - whatever it is, keep the old one
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            else:
                p = self.pipeline
                p.swap_inspector(new)
                p.deadline_ns = int(new_cfg.inspection.deadline_ms * 1e6)
                p.failsafe = new_cfg.inspection.failsafe
                if self.reporter is not None:
                    self.reporter.failsafe_policy = new_cfg.inspection.failsafe
                if self.recorder is not None:
                    self.recorder.pass_sample = new_cfg.recorder.pass_sample
                    self.recorder.max_bytes = int(new_cfg.recorder.max_mb * 1024 * 1024)
                    self.recorder.min_free_bytes = int(new_cfg.recorder.min_free_mb * 1024 * 1024)
                if new_cfg.frame_checks != self.cfg.frame_checks:
                    p.frame_checks = FrameChecker(new_cfg.frame_checks.settings())
                restart = [s for s in _RESTART_SECTIONS
                           if getattr(new_cfg, s) != getattr(self.cfg, s)]
                self.cfg = new_cfg
                self.prom.set_model(new.info())
                result = {"ok": True, "model_sha256": new.model_sha256,
                          "previous_sha256": old.model_sha256, "threshold": new.threshold}
                if restart:
                    result["needs_restart"] = restart
                    log.warning("reload: changes to [%s] take effect only after a restart",
                                "], [".join(restart))
                log.info("reload (%s): now running %s", origin, new.describe())
            result["origin"] = origin
            result["ts"] = round(time.time(), 3)
            self.last_reload = result
            self.prom.reloads.labels("ok" if result["ok"] else "refused").inc()
            if not result["ok"]:
                log.error("reload (%s) REFUSED: %s; still running %s", origin, result["error"],
                          old.describe())
            if self.link is not None:
                self.link.publish_raw("events/reload", result, qos=1)
            self._publish_status()
            self.notifier.ready(self.status_line() if self.pipeline else "")
            return result

    # -- the supervising loop ------------------------------------------------------------
    def _publish_status(self) -> None:
        if self.link is not None:
            try:
                self.link.publish_status(self.overall_state())
            except Exception:  # noqa: BLE001
                log.exception("status publish failed")

    def _update_prom(self) -> None:
        p = self.pipeline
        h = self.health()
        self.prom.update(queues=p.queue_depths(), gate=h["gate"], source=h["source"],
                         mqtt=h["mqtt"],
                         outbox=self.link.outbox_depth() if self.link is not None else None,
                         paused=h["paused"],
                         recorder=self.recorder.counters() if self.recorder else None,
                         mode=p.mode,
                         selector=p.selector.counters() if p.selector is not None else None)
        self.prom.set_alerts(self.alerts_dropped(),
                             self.link.disk_full() if self.link is not None else False)

    def run(self) -> int:
        """Supervise until stopped or the source ends; then drain and close. Exit code."""
        p = self.pipeline
        t_start = time.monotonic()
        next_tick = next_status = next_metrics = 0.0
        last_state = last_detail = None
        metrics_every = self.cfg.mqtt.metrics_interval_s
        try:
            while not self._stop.is_set():
                self._wake.wait(0.25)
                self._wake.clear()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload("SIGHUP")
                self.kicks.drain(self.link)
                now = time.monotonic()
                # an unplugged camera: up and degraded, waiting for it (READY at once, so
                # systemd does not time the start out while the device is away)
                if not self.ready and (p.counts["parts"] > 0 or p.waiting_for_source or
                                       now - t_start > self.ready_timeout_s or p.finished):
                    self.ready = True
                    self.notifier.ready(self.status_line())
                    log.info("ready: %s", self.status_line())
                if p.finished:
                    if p.error:
                        log.error("pipeline failed: %s", p.error)
                    else:
                        log.info("source ended: %s", p.source_reason or "done")
                    break
                if now >= next_tick:
                    next_tick = now + 0.5
                    p.check_stall()
                    if p.waiting_for_source:
                        # reconnecting with backoff is alive, not hung: a restart would not
                        # bring the camera back, and systemd's start limit would give up
                        self.watchdog.progress()
                    self._update_prom()
                    state = self.overall_state()
                    detail = self.health()
                    if state != last_state or detail != last_detail:
                        # the first state too when it is degraded: a source that fails before
                        # the first tick must not start silently
                        if state != last_state and (last_state is not None or state == "degraded"):
                            log.log(logging.WARNING if state == "degraded" else logging.INFO,
                                    "state %s -> %s (%s)", last_state or "starting", state, detail)
                        last_state, last_detail = state, detail
                        self._publish_status()
                if now >= next_status:
                    next_status = now + self.status_interval_s
                    self.notifier.status(self.status_line())
                if self.link is not None and now >= next_metrics:
                    next_metrics = now + metrics_every
                    self.link.publish_metrics(self.metrics_payload())
        finally:
            self.shutdown()
        return 1 if p.error else 0

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """STOPPING; finish every part in flight (gate + reports), then close everything."""
        if self.pipeline is not None and not getattr(self, "_shut", False):
            self._shut = True
            self.notifier.stopping()
            t = time.monotonic()
            drained = self.pipeline.stop(drain_timeout)
            s = self.pipeline.stats()
            log.info("stopped: %s parts (%s pass, %s reject, %s failsafe) in flight drained %s "
                     "in %.0f ms", s["parts"], s["pass"], s["reject"], s["failsafe"],
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
        from .trigger_sources import MqttTrigger

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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=argv[0], description="Run the inspection daemon.")
    ap.add_argument("--config", "-c", required=True, help="path to config.toml")
    ap.add_argument("--no-devices", action="store_true",
                    help="start even if the camera or gate device is not plugged in yet")
    ap.add_argument("--pid-file", type=Path,
                    help="write this process's pid here at start and remove it on exit "
                         "(for deploy-model --pid-file outside systemd)")
    args = ap.parse_args(argv[1:])
    from .logs import setup_logging

    setup_logging("INFO")
    try:
        cfg = load_config(args.config, strict_devices=not args.no_devices)
    except ConfigError as e:
        return print_problems(e.problems)
    logging.getLogger().setLevel(cfg.log.level)
    for line in config_warnings(cfg):
        log.warning("%s", line)
    log.info("edge-inspect %s starting: station %s, config %s", __version__, cfg.station.id,
             args.config)
    if args.pid_file is not None:
        try:
            _write_pid(args.pid_file)
        except OSError as e:
            return print_problems([f"--pid-file: cannot write {args.pid_file}: {e.strerror}"])
    try:
        agent = Agent(cfg, config_path=args.config)
        try:
            agent.start()
        except StartupError as e:
            return print_problems(e.problems)
        signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
        signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
        return agent.run()
    finally:
        if args.pid_file is not None:
            _remove_pid(args.pid_file)


def _write_pid(path: Path) -> None:
    """Atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pid(path: Path) -> None:
    # only our own: another agent may have taken the file over since
    try:
        if path.read_text().split()[:1] == [str(os.getpid())]:
            path.unlink()
    except (OSError, IndexError):
        pass
