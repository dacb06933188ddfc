"""The operator page over real HTTP, against a running line (issue 18): the page and its
state, images, auth (401), control refused when off, paths that try to leave the recorder
directory, the review queue and export-labels."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import numpy as np
import pytest

from agent.config import ConfigError, check_environment, parse_config
from agent.types import Inspection, Verdict
from agent.report.ui import overlay
from agent.report.ui.state import UiState
from tests.helpers import wait_until
from tests.support import PY, ROOT
from ui_support import Client, start_line


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Read-only page, loopback, no token."""
    tmp = tmp_path_factory.mktemp("ui-line")
    agent = start_line(tmp)
    yield agent, Client(agent.ui.port), tmp
    agent.shutdown()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Token and control on."""
    tmp = tmp_path_factory.mktemp("ui-guarded")
    tok = tmp / "token"
    tok.write_text("s3cret-token\n")
    tok.chmod(0o600)
    agent = start_line(tmp, token_file=str(tok), control=True)
    yield agent, agent.ui.port, tmp
    agent.shutdown()


def _recorded_reject(c: Client) -> dict:
    found = {}

    def has():
        q = c.json("/api/review")
        items = [i for i in q["items"] if i["verdict"] == "REJECT" and i["review"] is None]
        if items:
            found.update(items[0])
        return bool(items)

    assert wait_until(has, timeout=60, step=0.1), "no reject recorded"
    return found


def test_page_state_and_images(line):
    agent, c, _ = line
    code, h, body = c.get("/")
    assert code == 200 and h["Content-Type"].startswith("text/html") and b"/static/app.js" in body
    for name in ("app.js", "style.css"):
        assert c.get(f"/static/{name}")[0] == 200
    assert c.get("/static/../server.py")[0] == 404
    assert wait_until(lambda: c.json("/api/state")["rejects"], timeout=60, step=0.1)
    s = c.json("/api/state")
    assert s["counters"]["parts"] > 0 and s["counters"]["reject"] >= 1
    assert s["health"]["model_sha256"] == agent.inspector.model_sha256
    assert s["health"]["threshold"] == agent.inspector.threshold
    assert s["health"]["trigger"] and s["control"] is False
    # the demo model outputs class scores only: the page says so, and shows plain images
    assert s["health"]["defect_map"] is False and s["rejects"][0]["has_map"] is False
    assert len(s["counters"]["hourly"]) == 24 and sum(
        b["pass"] + b["reject"] + b["failsafe"] for b in s["counters"]["hourly"]) > 0
    assert s["counters"]["rate_per_min"] > 0
    seq = s["rejects"][0]["seq"]
    code, h, jpg = c.get(f"/api/reject/{seq}.jpg")
    assert code == 200 and h["Content-Type"] == "image/jpeg" and jpg[:2] == b"\xff\xd8"
    code, _, live = c.get("/api/live.jpg")
    assert code == 200 and live[:2] == b"\xff\xd8"
    assert c.get("/api/reject/999999999.jpg")[0] == 404
    # counters move
    n = s["counters"]["parts"]
    assert wait_until(lambda: c.json("/api/state")["counters"]["parts"] > n, timeout=30, step=0.1)


def test_control_refused_when_off(line):
    agent, c, _ = line
    for verb, body in (("pause", {}), ("resume", {}), ("threshold", {"value": 0.1})):
        code, _, out = c.post(f"/api/control/{verb}", body)
        assert code == 403 and b"control is off" in out
    assert agent.pipeline.paused is False and agent.inspector.threshold != 0.1
    assert agent.pipeline.inspector.threshold != 0.1


def test_post_needs_the_header_and_json(line):
    _, c, _ = line
    item = _recorded_reject(c)
    body = json.dumps({"path": item["path"], "label": "good"}).encode()
    code, _, _ = c.request("POST", "/api/review", body,
                           headers={"Content-Type": "application/json", "X-Edge-Inspect": None})
    assert code == 403
    code, _, _ = c.request("POST", "/api/review", body,
                           headers={"Content-Type": "text/plain", "X-Edge-Inspect": "1"})
    assert code == 403
    mine = [i for i in c.json("/api/review")["items"] if i["path"] == item["path"]]
    assert mine and mine[0]["review"] is None


def test_a_foreign_host_header_is_refused(line):
    _, c, _ = line
    code, _, _ = c.get("/api/state", headers={"Host": "evil.example:80"})
    assert code == 403


TRAVERSALS = [
    "/recorded/../../../../etc/passwd",
    "/recorded/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/recorded/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/recorded/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/recorded/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/recorded/..%5c..%5c..%5cetc%5cpasswd",
    "/recorded//etc/passwd",
    "/recorded/%2fetc%2fpasswd",
    "/recorded/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/recorded/./../rec/../../etc/passwd",
    "/recorded/outside.png",          # a symlink in the recorder dir pointing out of it
]


def test_paths_cannot_leave_the_recorder_dir(line, tmp_path):
    agent, c, tmp = line
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"root:x:0:0 SECRET")
    rec = agent.cfg.recorder.dir
    rec.mkdir(parents=True, exist_ok=True)
    os.symlink(secret, rec / "outside.png")
    for path in TRAVERSALS:
        code, _, body = c.get(path)
        assert code in (400, 404), (path, code)
        assert b"SECRET" not in body and b"root:" not in body, path
    for bad in ("../secret.png", "..%2fsecret.png", "/etc/passwd", "outside.png",
                "20990101/reject/../../../secret.png"):
        code, _, _ = c.post("/api/review", {"path": bad, "label": "good"})
        assert code == 400, bad
    assert not (rec / "reviews.jsonl").exists() or b"secret" not in (rec / "reviews.jsonl").read_bytes()
    # and a real recorded image is served
    item = _recorded_reject(c)
    code, h, png = c.get("/recorded/" + item["path"])
    assert code == 200 and png[:4] == b"\x89PNG"


def test_review_then_export_labels(line, tmp_path):
    agent, c, _ = line
    item = _recorded_reject(c)
    code, _, out = c.post("/api/review", {"path": item["path"], "label": "banana"})
    assert code == 400
    code, _, out = c.post("/api/review", {"path": item["path"], "label": "good", "by": "tester"})
    assert code == 200, out
    r = json.loads(out)["review"]
    assert r["label"] == "good" and r["by"] == "tester" and r["at"] > 0
    q = c.json("/api/review")
    mine = [i for i in q["items"] if i["path"] == item["path"]][0]
    assert mine["review"]["label"] == "good" and mine["review"]["by"] == "tester"
    line_ = (agent.cfg.recorder.dir / "reviews.jsonl").read_text().splitlines()[-1]
    assert json.loads(line_)["image"] == item["path"]
    dest = tmp_path / "dataset"
    p = subprocess.run([PY, "-m", "agent", "export-labels", str(dest), "--recorder-dir",
                        str(agent.cfg.recorder.dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    name = item["path"].rsplit("/", 1)[-1]
    got = dest / "good" / name
    assert got.read_bytes() == (agent.cfg.recorder.dir / item["path"]).read_bytes()
    assert "exported 1 reviewed image(s)" in p.stdout
    again = subprocess.run([PY, "-m", "agent", "export-labels", str(dest), "--recorder-dir",
                            str(agent.cfg.recorder.dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "not an empty folder" in again.stderr


def _basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_auth_401_without_the_token(guarded):
    agent, port, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": _basic("a", "x")},
                    {"Authorization": "Basic !!notbase64"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Bearer s3cret-token-and-more"}):
        c = Client(port, headers)
        for path in ("/", "/api/state", "/static/app.js", "/api/live.jpg", "/recorded/x.png"):
            code, h, _ = c.get(path)
            assert code == 401, (headers, path, code)
            assert h["WWW-Authenticate"].startswith("Basic")
        code, _, _ = c.post("/api/control/pause")
        assert code == 401
    assert agent.pipeline.paused is False
    assert Client(port, {"Authorization": "Bearer s3cret-token"}).get("/api/state")[0] == 200
    assert Client(port, {"Authorization": _basic("alice", "s3cret-token")}).get("/")[0] == 200


def test_control_with_control_on(guarded):
    agent, port, _ = guarded
    c = Client(port, {"Authorization": _basic("alice", "s3cret-token")})
    for bad in ("0.3", True, None, 1.5, -0.1, "nan"):
        code, _, _ = c.post("/api/control/threshold", {"value": bad})
        assert code == 400, bad
    code, _, out = c.post("/api/control/threshold", {"value": 0.42})
    assert code == 200 and json.loads(out)["threshold"] == 0.42
    assert agent.pipeline.inspector.threshold == 0.42
    assert c.post("/api/control/pause")[0] == 200 and agent.pipeline.paused is True
    assert c.json("/api/state")["health"]["paused"] is True
    assert c.post("/api/control/resume")[0] == 200 and agent.pipeline.paused is False
    assert c.post("/api/control/reload")[0] == 404
    # the Basic user name is the reviewer
    item = _recorded_reject(c)
    code, _, out = c.post("/api/review", {"path": item["path"], "label": "defect", "by": "x"})
    assert code == 200 and json.loads(out)["review"]["by"] == "alice"


def test_config_needs_a_token_beyond_loopback(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config({"ui": {"port": 8088, "bind": "0.0.0.0"}})
    assert any(p.startswith("ui.token_file:") for p in e.value.problems)
    cfg = parse_config({"ui": {"port": 8088, "bind": "0.0.0.0", "token_file": "tok"}}, tmp_path)
    assert any(p.startswith("ui.token_file:") and "does not exist" in p
               for p in check_environment(cfg, strict_devices=False))
    assert parse_config({"ui": {"port": 8088}}).ui.control is False


class _MapInspection(Inspection):
    """An Inspection from an engine that gives a defect map (no slots: it carries one)."""


def _insp(seq: int, image, dmap=None) -> Inspection:
    i = _MapInspection(f"p-{seq}", seq, "x", 0, 1.7e9, Verdict.REJECT, "defect", 0.9, 0.5,
                       image=image)
    if dmap is not None:
        i.defect_map = dmap
    return i


def test_overlay_marks_where_the_map_is_hot():
    img = np.full((64, 64), 128, np.uint8)
    dmap = np.zeros((4, 4), np.float32)
    dmap[0, 3] = 0.95                         # top-right cell
    out = overlay.draw_overlay(img, dmap)
    tr, bl = out[:16, 48:].astype(int), out[48:, :16].astype(int)
    assert np.abs(tr - 128).mean() > 20 and np.abs(bl - 128).mean() < 1
    state = UiState(4)
    state(_insp(1, img, dmap))
    state(_insp(2, img))
    with_map, without = state.reject(1), state.reject(2)
    assert with_map.has_map and not without.has_map and state.maps_seen == 1
    assert with_map.jpeg(True) != with_map.jpeg(False)
    assert without.jpeg(True) == without.jpeg(False)
    # (1, h, w) and (h, w, classes) maps from an engine are accepted; garbage is not drawn
    assert overlay.as_map(np.zeros((1, 5, 7))).shape == (5, 7)
    assert overlay.as_map(np.zeros((5, 7, 3))).shape == (5, 7)
    assert overlay.as_map(np.array([np.nan])) is None and overlay.as_map(None) is None


def test_presence_live_view_shows_the_belt_and_the_tracked_part(tmp_path):
    """In presence mode the live picture is the whole belt frame with the ROI, the reference
    line and a box round each tracked part (decoded from a real simulated line video)."""
    import cv2
    from agent.commands.daemon import Agent
    from agent.commands.simulate_line import LineSpec, labelled_images, render
    from ui_support import DEMO_DATA, _NoNotify, line_config
    video = str(tmp_path / "line.avi")
    truth = render(LineSpec(rate=2.0, parts=6, part_px=160, speed=600.0),
                   labelled_images(DEMO_DATA / "images"), video)
    raw = line_config(tmp_path).model_dump(mode="json")
    raw["camera"] = {"source": video, "fps": truth["fps"], "loop": True}
    raw["trigger"] = {"mode": "presence"}
    cfg = parse_config(raw, tmp_path)
    agent = Agent(cfg, notifier=_NoNotify()).start()
    try:
        c = Client(agent.ui.port)
        got = {}

        def boxed():
            st, h, body = c.request("GET", "/api/live.jpg")
            if st != 200 or h.get("X-View") != "parts":
                return False
            img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            # a part box: green or orange pixels, which the grey belt and parts lack
            g = (img[..., 1] > 150) & (img[..., 2] < 80) & (img[..., 0] < 80)
            o = (img[..., 2] > 200) & (img[..., 1] > 120) & (img[..., 1] < 200) & (img[..., 0] < 60)
            got.update(shape=img.shape, box=int(g.sum() + o.sum()))
            return got["box"] > 200
        assert wait_until(boxed, timeout=30, step=0.2), got
        assert got["shape"][:2] == (480, 640)                 # the frame, not a part's crop
    finally:
        agent.shutdown()
