"""Reload: re-read the config and the model, swap them in atomically or refuse and keep
the running ones (SIGHUP, MQTT cmd/reload, deploy-model).

A reload builds a new ``RuntimeSettings`` from the new config and hands each running part
its share through ``_hand_over``; every other section is compared, and a changed one is
reported as needing a restart. A mixin of Agent (agent/commands/daemon.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.config import Config, ConfigError, FrameChecks, load_config
from agent.frame_checks import FrameChecker
from agent.runtime.inspector import Inspector, InspectorError

log = logging.getLogger("daemon")

# Sections whose change needs a restart (the rest is applied by a reload).
RESTART_SECTIONS = ("station", "camera", "gate", "mqtt", "metrics", "ui", "trigger")


@dataclass(frozen=True)
class RuntimeSettings:
    deadline_ms: float
    failsafe: str
    pass_sample: float
    recorder_max_bytes: int
    recorder_min_free_bytes: int
    frame_checks: FrameChecks

    @classmethod
    def from_config(cls, cfg: Config) -> "RuntimeSettings":
        r = cfg.recorder
        return cls(deadline_ms=cfg.inspection.deadline_ms, failsafe=cfg.inspection.failsafe,
                   pass_sample=r.pass_sample, recorder_max_bytes=int(r.max_mb * 1024 * 1024),
                   recorder_min_free_bytes=int(r.min_free_mb * 1024 * 1024),
                   frame_checks=cfg.frame_checks)


def needs_restart(old: Config, new: Config) -> list[str]:
    return [s for s in RESTART_SECTIONS if getattr(new, s) != getattr(old, s)]


class Reloads:
    def set_threshold(self, value: float) -> tuple[float, float]:
        """(previous, now): the running inspector's threshold, until the next reload."""
        p = self.pipeline
        with self._reload_lock:
            old = p.inspector.threshold
            p.set_threshold(value)
        self.prom.set_model(p.inspector.info())
        return old, p.inspector.threshold

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
                result = self._swap_in(new_cfg, new, old)
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
            self.publish_status()
            self.notifier.ready(self.status_line() if self.pipeline else "")
            return result

    def _swap_in(self, new_cfg: Config, new: Inspector, old: Inspector) -> dict:
        self.pipeline.swap_inspector(new)
        self._hand_over(RuntimeSettings.from_config(new_cfg),
                        RuntimeSettings.from_config(self.cfg))
        restart = needs_restart(self.cfg, new_cfg)
        self.cfg = new_cfg
        self.prom.set_model(new.info())
        result = {"ok": True, "model_sha256": new.model_sha256,
                  "previous_sha256": old.model_sha256, "threshold": new.threshold}
        if restart:
            result["needs_restart"] = restart
            log.warning("reload: changes to [%s] take effect only after a restart",
                        "], [".join(restart))
        return result

    def _hand_over(self, rs: RuntimeSettings, was: RuntimeSettings) -> None:
        """Each running part gets its share of the reloaded settings."""
        p = self.pipeline
        p.deadline_ns = int(rs.deadline_ms * 1e6)
        p.failsafe = rs.failsafe
        if self.reporter is not None:
            self.reporter.failsafe_policy = rs.failsafe
        if self.recorder is not None:
            self.recorder.pass_sample = rs.pass_sample
            self.recorder.max_bytes = rs.recorder_max_bytes
            self.recorder.min_free_bytes = rs.recorder_min_free_bytes
        if rs.frame_checks != was.frame_checks:
            p.frame_checks = FrameChecker(rs.frame_checks.settings())
