"""MQTT commands: the pydantic models a payload on ``<prefix>/<station>/cmd/<verb>`` must
match, the one validator the link runs, and the JSON schemas generated from the models.

The models are the rule; ``firmware_io/schemas/command_*.json`` are written from them
(``python -m firmware_io.commands`` rewrites them, ``--check`` says whether they are
current), so the published schemas cannot drift from what the link accepts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.json_schema import GenerateJsonSchema

# A decision threshold: the one range rule for the config's override, the threshold command
# and the operator page (a score is a probability, so anything outside [0, 1] rejects
# every part or none).
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_THRESHOLD = TypeAdapter(Threshold)


def is_threshold(value: Any) -> bool:
    """Whether ``value`` is a Threshold, as strict as the command: a number (not true/false,
    not "0.3"), finite, in [0, 1]. For the checks that are not a pydantic field (the
    operator page's control, the inspector, a bundle's manifest)."""
    try:
        _THRESHOLD.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True

# A command is a few fields; anything bigger is refused unparsed, and a reply never
# quotes more than this much of what it was sent.
MAX_COMMAND_BYTES = 64 * 1024
MAX_ERROR_CHARS = 400
REQUEST_ID_CHARS = 128

SCHEMAS = Path(__file__).resolve().parent / "schemas"

log = logging.getLogger("firmware_io.mqtt")


class _Cmd(BaseModel):
    # strict: JSON true is not 1.0 and "0.3" is not 0.3 (an operator's typo must not
    # silently set the threshold to 1.0 and stop every reject)
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: Optional[str] = Field(default=None, max_length=REQUEST_ID_CHARS,
                                      description="echoed in the reply")


class PauseCmd(_Cmd):
    """Every part is FAILSAFE (handled by [inspection] failsafe) until resume."""


class ResumeCmd(_Cmd):
    """Inspection again after a pause."""


class ReloadCmd(_Cmd):
    """Re-read the config file and the model, as SIGHUP does."""


class ThresholdCmd(_Cmd):
    """Set the decision threshold until the next reload or restart."""
    value: Threshold = Field(description="a JSON number (not a string, not true/false), "
                                         "finite, in [0, 1]")


class CommandReply(BaseModel):
    """QoS 1 on <prefix>/<station>/cmd/<verb>/reply. ok=false with error for a refused
    command (the handler was not called); otherwise the handler's result with ok, verb,
    request_id, station added where missing."""
    model_config = ConfigDict(extra="allow")
    ok: bool
    verb: Optional[str] = None
    error: Optional[str] = None
    request_id: Optional[str] = None
    station: Optional[str] = None


COMMANDS: dict[str, type[_Cmd]] = {
    "pause": PauseCmd, "resume": ResumeCmd, "reload": ReloadCmd, "threshold": ThresholdCmd,
}


class CommandError(ValueError):
    """A refused command; request_id is the caller's, when it could be read."""

    def __init__(self, reason: str, request_id: str | None = None):
        super().__init__(clip(reason, MAX_ERROR_CHARS))
        self.request_id = request_id


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _request_id(data) -> str | None:
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= REQUEST_ID_CHARS else None


def validate_command(verb: str, raw: bytes) -> dict:
    """-> the validated arguments (request_id included), or raise CommandError (a
    ValueError) with a short reason and the request_id when one was readable."""
    model = COMMANDS.get(verb)
    if model is None:
        raise CommandError(f"unknown command {clip(verb, 64)!r}; known: "
                           f"{', '.join(sorted(COMMANDS))}")
    if raw and len(raw) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload is {len(raw)} bytes; a command is at most "
                           f"{MAX_COMMAND_BYTES}")
    try:
        text = raw.decode("utf-8", errors="strict").strip() if raw else ""
        data = json.loads(text) if text else {}
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError("payload must be a JSON object")
    try:
        cmd = model.model_validate(data)
    except ValidationError as exc:
        errs = "; ".join(f"{clip('.'.join(str(p) for p in e['loc']), 64) or '(payload)'}: "
                         f"{e['msg']}" for e in exc.errors()[:5])
        raise CommandError(errs, _request_id(data)) from None
    return cmd.model_dump()


def run_command(verb: str, raw: bytes, handler: Callable[[str, dict], dict] | None,
                station: str, count: Callable[[str], None] = lambda key: None
                ) -> tuple[str, dict]:
    """Validate a received command, run ``handler(verb, args)`` on it if it is good, and
    return (the verb to reply under, the reply). A bad command never reaches the handler;
    a handler that raises is a refusal too. ``count``: cmd_rejected, cmd_ok, cmd_failed."""
    reply: dict[str, Any]
    request_id = None
    if len(verb) > 64 or any(ch in verb for ch in "#+"):
        verb = "invalid"
    try:
        args = validate_command(verb, raw)
        request_id = args.pop("request_id", None)
        if handler is None:
            raise ValueError("this station does not handle commands")
    except ValueError as exc:
        count("cmd_rejected")
        request_id = getattr(exc, "request_id", None) or request_id
        log.warning("mqtt: bad command %r: %s", verb, exc)
        reply = {"ok": False, "verb": verb, "error": str(exc)}
    else:
        try:
            result = handler(verb, args)
            reply = dict(result) if isinstance(result, dict) else {"result": result}
            reply.setdefault("ok", True)
            count("cmd_ok")
        except Exception as exc:
            count("cmd_failed")
            log.exception("mqtt: command %s failed", verb)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply.setdefault("verb", verb)
    if request_id is not None:
        reply.setdefault("request_id", request_id)
    reply.setdefault("station", station)
    if isinstance(reply.get("error"), str):
        reply["error"] = clip(reply["error"], MAX_ERROR_CHARS)
    return verb, reply


# ---------------------------------------------------------------------------- schemas


class _NoTitles(GenerateJsonSchema):
    # pydantic titles every property after its name ("Request Id"): noise in a schema a
    # PLC programmer reads
    def field_title_should_be_set(self, schema) -> bool:
        return False


_COMMAND_NOTE = ("Published by an operator on <prefix>/<station>/cmd/{verb} (only handled "
                 "with [mqtt] commands = true). An empty payload counts as {{}} for verbs "
                 "without fields. Unknown fields are an error; types are strict; a payload "
                 f"over {MAX_COMMAND_BYTES} bytes is refused unparsed.")


def _schema(model: type[BaseModel], name: str, title: str, description: str) -> dict:
    body = model.model_json_schema(schema_generator=_NoTitles)
    body.pop("title", None)
    body.pop("description", None)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"edge-inspect/firmware_io/schemas/{name}", "title": title,
            "description": description, **body}


def command_schemas() -> dict[str, dict]:
    """{file name: JSON schema} for every command and the reply, from the models."""
    out = {}
    for verb, model in COMMANDS.items():
        doc = " ".join((model.__doc__ or "").split())
        out[f"command_{verb}.json"] = _schema(model, f"command_{verb}.json",
                                              f"Command {verb}",
                                              f"{doc} {_COMMAND_NOTE.format(verb=verb)}")
    out["command_reply.json"] = _schema(CommandReply, "command_reply.json", "Command reply",
                                        " ".join((CommandReply.__doc__ or "").split()))
    return out


def schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m firmware_io.commands",
                                 description="Write firmware_io/schemas/command_*.json from "
                                             "the command models.")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a checked-in schema is not the generated one")
    args = ap.parse_args(argv)
    stale = []
    for name, schema in command_schemas().items():
        path = SCHEMAS / name
        text = schema_text(schema)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
    for name in stale:
        print(f"{'stale' if args.check else 'wrote'}: {SCHEMAS / name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
