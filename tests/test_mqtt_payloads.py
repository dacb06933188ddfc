"""What a running agent really publishes, against firmware_io/schemas/ and docs/mqtt.md.

One agent on the committed demo bundle (agent/demo_data/bundle), its demo images plus one
corrupt file (a FAILSAFE part), a real broker; a reload over MQTT. Every events/reject and
events/reload message it publishes is checked against its JSON schema (a small validator:
no jsonschema here).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.commands.daemon import Agent
from tests.support import MqttCollector, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "firmware_io" / "schemas"
DEMO = ROOT / "agent" / "demo_data"
STATION = "line-3"

_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool,
          "object": dict, "array": list, "null": type(None)}


def validate(schema: dict, value, where: str = "$") -> list[str]:
    """The subset of JSON Schema the schemas use: type, enum, required, properties,
    additionalProperties (false or a schema), items."""
    errs = []
    t = schema.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else t
        ok = any(isinstance(value, _TYPES[n]) and not (n in ("number", "integer")
                                                      and isinstance(value, bool))
                 for n in names)
        if not ok:
            return [f"{where}: {value!r} is not {t}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{where}: {k} missing" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += validate(props[k], v, f"{where}.{k}")
            elif extra is False:
                errs.append(f"{where}: unexpected {k}")
            elif isinstance(extra, dict):
                errs += validate(extra, v, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errs += validate(schema["items"], v, f"{where}[{i}]")
    return errs


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@pytest.fixture(scope="module")
def published(mqtt_broker, tmp_path_factory):
    """{suffix: [payload, ...]} of what one agent run published."""
    tmp = tmp_path_factory.mktemp("payloads")
    imgs = tmp / "imgs"
    imgs.mkdir()
    for p in sorted((DEMO / "images").glob("defect_*"))[:4]:
        shutil.copy(p, imgs / p.name)
    (imgs / "zz_corrupt.png").write_bytes(b"not an image")
    cfg = parse_config({
        "station": {"id": STATION},
        "camera": {"source": str(imgs)},
        "model": {"bundle": str(DEMO / "bundle"), "threads": 1},
        "inspection": {"deadline_ms": 5000},
        "gate": {"kind": "none"},
        "mqtt": {"enabled": True, "host": mqtt_broker.host, "port": mqtt_broker.port,
                 "outbox": str(tmp / "outbox.sqlite"), "commands": True},
        "metrics": {"port": 0},
        "recorder": {"dir": str(tmp / "rec")},
    }, tmp)
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, f"edge-inspect/{STATION}/#")
    agent = Agent(cfg)
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: len(col.on("events/reject")) >= 5, timeout=60, what="5 alerts")
        col.c.publish(f"edge-inspect/{STATION}/cmd/reload", "{}", qos=1)
        wait_for(lambda: col.on("events/reload"), timeout=60, what="events/reload")
    finally:
        agent.request_stop()
        th.join(20)
        col.close()
    return {"events/reject": col.on("events/reject"), "events/reload": col.on("events/reload"),
            "record_dir": str(tmp / "rec")}


def test_reject_and_reload_payloads_match_their_schemas(published):
    rejects = published["events/reject"]
    assert {e["verdict"] for e in rejects} == {"REJECT", "FAILSAFE"}
    rs = schema("reject_event.json")
    for e in rejects:
        assert validate(rs, e) == [], e
        # the schema names every key the code sends, and the code sends every key it names
        assert set(e) == set(rs["properties"]), set(e) ^ set(rs["properties"])
    failsafe = [e for e in rejects if e["verdict"] == "FAILSAFE"]
    assert failsafe and all(e["label"] == "" and e["score"] is None for e in failsafe)
    # [gate] kind = "none": nothing commanded, nothing late
    assert all(e["gate"] == {"target": "", "late": False, "error": None, "commanded": False}
               for e in rejects)
    (reload,) = published["events/reload"]
    assert validate(schema("reload_event.json"), reload) == [], reload
    assert reload["ok"] is True and reload["origin"] == "mqtt"


def test_validator_catches_what_the_schemas_forbid():
    rs = schema("reject_event.json")
    assert validate(rs["properties"]["label"], None)                # label is never null
    assert validate(rs["properties"]["gate"], {"sent": True})       # no gate.sent
    assert validate(schema("reload_event.json"), {"ok": True, "origin": "x", "ts": 1.0})


def _doc_example(after: str) -> dict:
    """The first ```json block in docs/mqtt.md after the line starting with `after`."""
    text = (ROOT / "docs" / "mqtt.md").read_text()
    rest = text[text.index(after):]
    block = rest[rest.index("```json") + len("```json"):]
    return json.loads(block[:block.index("```")])


def test_mqtt_md_reject_example_is_what_the_agent_publishes(published):
    doc = _doc_example("Reject event (the agent builds it")
    real = next(e for e in published["events/reject"] if e["verdict"] == "REJECT")
    assert set(doc) == set(real), set(doc) ^ set(real)
    assert set(doc["gate"]) == set(real["gate"]) and set(doc["timings"]) == set(real["timings"])
    # the shape of ids and paths: <prefix>-<seq>, <recorder.dir>/<YYYYMMDD>/reject/<part>.png
    for e in (doc, real):
        prefix, seq = e["part"].rsplit("-", 1)
        assert seq == str(e["seq"]) and prefix.isalnum() and len(prefix) == len(real["part"]) - \
            len(str(real["seq"])) - 1, e["part"]
        img = Path(e["image_path"])
        assert img.name == e["part"] + ".png" and img.parent.name == "reject", img
        assert len(img.parent.parent.name) == 8 and img.parent.parent.name.isdigit(), img
        assert Path(e["source_ref"]).suffix == ".png"           # a folder source: the file
    assert real["image_path"].startswith(published["record_dir"])
