"""The station's commands (MQTT cmd/<verb>, the operator page's control buttons): a table
of handlers, one small method per verb, as Frigate's comms/dispatcher.py has them.

Arguments arrive validated (firmware_io.commands for MQTT, the page's own check); a
handler returns the reply: {"ok": bool, ...}.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from agent.commands.daemon import Agent

log = logging.getLogger("daemon")


class CommandDispatcher:
    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.handlers: dict[str, Callable[[dict], dict]] = {
            "pause": self._pause,
            "resume": self._resume,
            "threshold": self._threshold,
            "reload": self._reload,
        }

    def __call__(self, verb: str, args: dict) -> dict:
        if self.agent.pipeline is None:
            return {"ok": False, "error": "not running yet"}
        handler = self.handlers.get(verb)
        if handler is None:
            return {"ok": False, "error": f"unknown command {verb!r}"}
        return handler(args)

    def _pause(self, args: dict) -> dict:
        self.agent.pipeline.pause()
        log.warning("inspection PAUSED by command: every part is FAILSAFE (%s) until resume",
                    self.agent.cfg.inspection.failsafe)
        self.agent.publish_status()
        return {"ok": True, "paused": True}

    def _resume(self, args: dict) -> dict:
        self.agent.pipeline.resume()
        log.info("inspection resumed by command")
        self.agent.publish_status()
        return {"ok": True, "paused": False}

    def _threshold(self, args: dict) -> dict:
        old, new = self.agent.set_threshold(float(args["value"]))
        log.info("threshold %g -> %g by command", old, new)
        self.agent.publish_status()
        return {"ok": True, "threshold": new, "previous": old}

    def _reload(self, args: dict) -> dict:
        return self.agent.reload("mqtt")
