"""The operator page's HTTP server: the standard library's ThreadingHTTPServer, a thread
per request, off the inspect path (it only reads what UiState and the Agent keep).

    GET  /                      the page (static/index.html; app.js and style.css beside it)
    GET  /api/state             health, counters, hourly bars, latest part, rejects (JSON)
    GET  /api/live.jpg          the latest part's image
    GET  /api/reject/<seq>.jpg  a reject's image, with its defect map when it has one
                                (?map=0: without)
    GET  /api/review            the review queue (recorded images, newest unreviewed first)
    GET  /recorded/<path>       a recorded image, <path> inside recorder.dir
    POST /api/review            {"path", "label", "by"?}: mark a recorded image
    POST /api/control/<verb>    pause, resume, threshold {"value"}: only with [ui] control

Every request is authenticated (agent/report/ui/auth.py) when a token is configured. A POST also
needs the `X-Edge-Inspect` header and a JSON body: a page on another site cannot send
either without a CORS preflight, which this server never grants, so a browser open on the
plant network cannot be made to pause the line. Without a token (loopback only), the Host
header must name this box, so a DNS-rebinding page cannot read it either.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from firmware_io.commands import is_threshold

from agent import __version__
from agent.report.ui import auth, overlay
from agent.report.ui.review import BadPath, ReviewStore
from agent.report.ui.state import UiState

log = logging.getLogger("ui")

STATIC = Path(__file__).resolve().parent / "static"
_STATIC_TYPES = {"index.html": "text/html; charset=utf-8",
                 "app.js": "text/javascript; charset=utf-8",
                 "style.css": "text/css; charset=utf-8"}
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
MAX_BODY = 4096
CONTROL_VERBS = ("pause", "resume", "threshold")
_REJECT = re.compile(r"/api/reject/(\d{1,12})\.jpg")


@dataclass
class UiApp:
    """Everything a request may read. `agent` is the running daemon.Agent."""
    agent: object
    state: UiState
    reviews: ReviewStore | None
    token: str | None
    control: bool
    live_fps: float
    loopback: bool

    # -- what the page shows -------------------------------------------------------------
    def live_view(self):
        """The presence selector's last frame and tracks, or None (other modes)."""
        sel = getattr(getattr(self.agent, "pipeline", None), "selector", None)
        view = getattr(sel, "live_view", None)
        return view() if callable(view) else None

    def page_state(self) -> dict:
        a = self.agent
        p = getattr(a, "pipeline", None)
        insp = p.inspector if p is not None else getattr(a, "inspector", None)
        stats = p.stats() if p is not None else {}
        health = dict(a.health()) if hasattr(a, "health") else {}
        trigger = getattr(getattr(a.cfg, "trigger", None), "mode", "frame")
        health.update(state=a.overall_state() if p is not None else "starting",
                      trigger=trigger, station=a.cfg.station.id)
        if insp is not None:
            health.update(model=insp.bundle.name, model_sha256=insp.model_sha256,
                          threshold=insp.threshold, threshold_source=insp.threshold_source,
                          engine=insp.engine.describe(), labels=list(insp.bundle.labels))
        # False until a part arrives with a map: this model gives class scores only
        health["defect_map"] = self.state.maps_seen > 0
        latest, rejects = self.state.snapshot()
        lat = stats.get("latency_ms", {})
        counters = {k: stats.get(k, 0) for k in ("parts", "pass", "reject", "failsafe")}
        counters.update(failsafe_reasons=stats.get("failsafe_reasons", {}),
                        rate_per_min=round(self.state.rate_per_min(), 1),
                        latency_p50_ms=lat.get("p50"), latency_p99_ms=lat.get("p99"),
                        hourly=self.state.bars())
        return {"version": __version__, "control": self.control, "live_fps": self.live_fps,
                "review": self.reviews is not None, "health": health, "counters": counters,
                "latest": latest.meta() if latest else None,
                "rejects": [s.meta() for s in rejects], "t": round(time.time(), 3)}

    def control_command(self, verb: str, body: dict) -> tuple[int, dict]:
        args = {}
        if verb == "threshold":
            v = body.get("value")
            # the MQTT command's rule: a number (not true, not "0.3"), finite, in [0, 1]
            if not is_threshold(v):
                return 400, {"ok": False, "error": "value: a number in [0, 1]"}
            args["value"] = float(v)
        out = self.agent.command(verb, args)
        return (200 if out.get("ok") else 409), out


def _host_name(host: str) -> str:
    host = host.strip()
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-inspect-ui"
    protocol_version = "HTTP/1.1"
    timeout = 15          # a client that stops mid-request frees its thread
    app: UiApp            # set on the subclass UiServer builds

    def log_message(self, fmt, *args):  # the journal is for the line, not for page polls
        log.debug("%s " + fmt, self.address_string(), *args)

    # -- answers -------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), "application/json")

    def _error(self, code: int, msg: str, extra: dict | None = None) -> None:
        self._send(code, json.dumps({"ok": False, "error": msg}).encode(), "application/json",
                   extra)

    # -- gatekeeping ---------------------------------------------------------------------
    def _allowed(self) -> auth.Caller | None:
        app = self.app
        if app.token is None and app.loopback:
            if _host_name(self.headers.get("Host") or "") not in _LOCAL_HOSTS:
                self._error(403, "this page answers to localhost only")
                return None
        caller = auth.check(self.headers.get("Authorization"), app.token)
        if not caller.ok:
            self._error(401, "authentication required",
                        {"WWW-Authenticate": 'Basic realm="edge-inspect", charset="UTF-8"'})
            return None
        return caller

    # -- GET -----------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if self._allowed() is None:
            return
        url = urlsplit(self.path)
        path = url.path
        app = self.app
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/api/state":
                return self._json(200, app.page_state())
            if path == "/api/live.jpg":
                latest, _ = app.state.snapshot()
                view = app.live_view()
                if view is not None:      # presence mode: the belt with the tracked parts
                    return self._send(200, overlay.jpeg(overlay.draw_parts(view)), "image/jpeg",
                                      {"X-Seq": str(latest.seq if latest else 0), "X-View": "parts"})
                data = latest.jpeg(False) if latest is not None else None
                if data is None:
                    return self._error(404, "no image yet")
                return self._send(200, data, "image/jpeg", {"X-Seq": str(latest.seq)})
            m = _REJECT.fullmatch(path)
            if m:
                shot = app.state.reject(int(m.group(1)))
                data = shot.jpeg(parse_qs(url.query).get("map", ["1"])[0] != "0") \
                    if shot is not None else None
                if data is None:
                    return self._error(404, "no such reject (or it has no image)")
                return self._send(200, data, "image/jpeg")
            if path == "/api/review":
                if app.reviews is None:
                    return self._error(404, "the recorder is off: nothing to review")
                return self._json(200, app.reviews.queue())
            if path.startswith("/recorded/"):
                return self._recorded(path[len("/recorded/"):])
        except (BrokenPipeError, ConnectionResetError):
            return
        return self._error(404, "not found")

    def _static(self, name: str) -> None:
        ctype = _STATIC_TYPES.get(name)      # a fixed list: no path from the request is used
        if ctype is None:
            return self._error(404, "not found")
        self._send(200, (STATIC / name).read_bytes(), ctype)

    def _recorded(self, raw: str) -> None:
        if self.app.reviews is None:
            return self._error(404, "the recorder is off")
        try:
            # decoded once; anything still encoded is refused by safe_relpath
            p = self.app.reviews.resolve(unquote(raw, errors="strict"))
        except (BadPath, UnicodeDecodeError) as e:
            return self._error(404 if isinstance(e, BadPath) and "no recorded" in str(e)
                               else 400, str(e))
        ctype = "image/png" if p.suffix.lower() == ".png" else "image/jpeg" \
            if p.suffix.lower() in (".jpg", ".jpeg") else "application/octet-stream"
        self._send(200, p.read_bytes(), ctype)

    # -- POST ----------------------------------------------------------------------------
    def do_POST(self):
        caller = self._allowed()
        if caller is None:
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self.close_connection = True
            return self._error(413, f"a body of at most {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        if self.headers.get("X-Edge-Inspect") is None or \
                not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._error(403, "POST needs the X-Edge-Inspect header and a JSON body")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self._error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "the body must be a JSON object")
        path = urlsplit(self.path).path
        app = self.app
        if path.startswith("/api/control/"):
            verb = path[len("/api/control/"):]
            if not app.control:
                return self._error(403, "control is off ([ui] control = false): read-only")
            if verb not in CONTROL_VERBS:
                return self._error(404, f"unknown control {verb!r}")
            code, out = app.control_command(verb, body)
            log.info("ui: %s by %s: %s", verb, caller.user or self.client_address[0], out)
            return self._json(code, out)
        if path == "/api/review":
            if app.reviews is None:
                return self._error(404, "the recorder is off: nothing to review")
            try:
                r = app.reviews.mark(str(body.get("path", "")), str(body.get("label", "")),
                                     caller.user or body.get("by"))
            except BadPath as e:
                return self._error(400, str(e))
            except ValueError as e:
                return self._error(400, str(e))
            return self._json(200, {"ok": True, "review": {
                "image": r.image, "label": r.label, "by": r.by, "at": r.at}})
        return self._error(404, "not found")


class UiServer:
    """Serves one UiApp on bind:port from a background thread (port 0: any free port)."""

    def __init__(self, app: UiApp, bind: str, port: int):
        self.app = app
        handler = type("UiHandler", (_Handler,), {"app": app})
        self.httpd = ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "UiServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ui",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
