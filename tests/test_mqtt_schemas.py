"""The command schemas in firmware_io/schemas/ are the ones the pydantic models generate,
and a real JSON Schema validator agrees with the link on what a command may be."""

from __future__ import annotations

import json

import jsonschema
import pytest

from firmware_io.commands import (COMMANDS, SCHEMAS, CommandError, command_schemas, main,
                                  schema_text, validate_command)


def test_checked_in_schemas_are_the_generated_ones():
    generated = command_schemas()
    assert set(generated) == {f"command_{v}.json" for v in COMMANDS} | {"command_reply.json"}
    for name, schema in generated.items():
        assert (SCHEMAS / name).read_text() == schema_text(schema), \
            f"{name} is stale: run python -m firmware_io.commands"
        jsonschema.Draft202012Validator.check_schema(schema)
    assert main(["--check"]) == 0


# (verb, payload): what an operator might send
PAYLOADS = [
    ("threshold", {"value": 0.3}),
    ("threshold", {"value": 1, "request_id": "r-1"}),
    ("threshold", {"value": 0}),
    ("threshold", {"value": True}),
    ("threshold", {"value": "0.3"}),
    ("threshold", {"value": 7}),
    ("threshold", {"value": -0.1}),
    ("threshold", {}),
    ("threshold", {"value": 0.3, "extra": 1}),
    ("threshold", {"value": 0.3, "request_id": "x" * 129}),
    ("threshold", {"value": 0.3, "request_id": 5}),
    ("pause", {}),
    ("pause", {"request_id": "p"}),
    ("pause", {"now": True}),
    ("resume", {"request_id": None}),
    ("reload", {}),
    ("reload", {"model": "v2"}),
]


@pytest.mark.parametrize("verb, payload", PAYLOADS, ids=[f"{v}:{json.dumps(p)[:40]}"
                                                         for v, p in PAYLOADS])
def test_the_schema_and_the_link_agree(verb, payload):
    schema = json.loads((SCHEMAS / f"command_{verb}.json").read_text())
    by_schema = jsonschema.Draft202012Validator(schema).is_valid(payload)
    try:
        validate_command(verb, json.dumps(payload).encode())
        by_link = True
    except CommandError:
        by_link = False
    assert by_schema == by_link, (verb, payload, by_schema, by_link)


def test_real_replies_match_the_reply_schema(tmp_path):
    """The replies the link publishes, for an accepted and a refused command."""
    from firmware_io.mqtt_config import MqttConfig
    from firmware_io.mqtt_link import MqttLink

    sent = []
    link = MqttLink(MqttConfig(outbox=tmp_path / "ob.sqlite"), station="st",
                    on_command=lambda verb, args: {"threshold": args.get("value")})
    link.publish_raw = lambda suffix, payload, qos=1, retain=False: sent.append((suffix, payload))
    link._handle_command("threshold", b'{"value": 0.4, "request_id": "a"}')
    link._handle_command("threshold", b'{"value": true, "request_id": "b"}')
    link._handle_command("pause", b"not json")
    reply = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "command_reply.json").read_text()))
    assert [s for s, _ in sent] == ["cmd/threshold/reply"] * 2 + ["cmd/pause/reply"]
    for _, payload in sent:
        reply.validate(json.loads(json.dumps(payload)))
    assert sent[0][1]["ok"] is True and sent[0][1]["request_id"] == "a"
    assert sent[1][1]["ok"] is False and sent[1][1]["request_id"] == "b"
    assert not reply.is_valid({"verb": "pause"})            # ok is required
