"""The checksummed ASCII line protocol between the host and a reject-gate controller.

Every line is ``<VERB> <field> <field> ...*XXXX\\n`` where XXXX is the CRC-16/CCITT-FALSE
(poly 0x1021, init 0xFFFF, no reflection, no final xor) of every byte before ``*``, in
upper-case hex. See docs/serial-protocol.md for the full specification.

``encode(verb, *fields)`` builds a line; ``LineParser`` turns an arbitrary byte stream
(partial lines, garbage, overlong lines) into typed messages and counts errors by kind.
"""

from __future__ import annotations

import binascii
import logging
import re
from dataclasses import dataclass, fields as dc_fields
from typing import ClassVar, Iterator, Literal

log = logging.getLogger(__name__)

PROTO_VERSION = 1
MAX_LINE = 256          # bytes, including "*XXXX\n"
MAX_TOKEN = 32          # part ids, keys, values, fw version
SEQ_MOD = 2**32         # seq is a decimal uint32; 0 is never used

_TOKEN_RE = re.compile(rb"^[\x21-\x7e]+$")      # printable ASCII, no space
_INT_RE = re.compile(r"^-?[0-9]{1,10}$")
_UINT_RE = re.compile(r"^[0-9]{1,10}$")
_AT_RE = re.compile(r"^([de])([0-9]{1,10})$")


# ---------------------------------------------------------------------------- CRC


def crc16_ccitt_false(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor).

    crc16_ccitt_false(b"123456789") == 0x29B1. binascii.crc_hqx is this same CRC, in C.
    """
    return binascii.crc_hqx(data, crc)


# ---------------------------------------------------------------------------- encode


class ProtocolError(ValueError):
    """A message that cannot be put on the line (bad field)."""


def _field_bytes(value: object) -> bytes:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        if value != int(value):
            raise ProtocolError(f"field {value!r}: only integers go on the line")
        value = int(value)
    raw = str(value).encode("ascii", errors="strict") if not isinstance(value, bytes) else value
    if not raw or not _TOKEN_RE.match(raw) or b"*" in raw:
        raise ProtocolError(f"field {value!r}: must be 1+ printable ASCII chars, no space or '*'")
    return raw


def frame(body: bytes) -> bytes:
    """body (everything before '*') -> full line with CRC and newline."""
    line = body + b"*%04X\n" % crc16_ccitt_false(body)
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def encode(verb: str, *fields: object, text: str | None = None) -> bytes:
    """encode("REJ", 7, "P42", 1, "d350", 50) -> b"REJ 7 P42 1 d350 50*XXXX\\n".

    ``text`` (FAULT only) is a free-text tail that may contain spaces (not '*', not
    control characters)."""
    parts = [_field_bytes(verb)] + [_field_bytes(f) for f in fields]
    if text is not None:
        t = text.strip().encode("ascii", errors="replace").replace(b"*", b"#")
        t = bytes(c if 0x20 <= c < 0x7F else 0x3F for c in t)
        if t:
            parts.append(t)
    return frame(b" ".join(parts))


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    VERB: ClassVar[str] = ""
    DIRECTION: ClassVar[str] = ""       # "to_gate" | "to_host"

    def encode(self) -> bytes:
        return encode(self.VERB, *(getattr(self, f.name) for f in dc_fields(self)))


# host -> gate

@dataclass(frozen=True)
class Hello(Message):
    VERB: ClassVar[str] = "HELLO"
    DIRECTION: ClassVar[str] = "to_gate"


@dataclass(frozen=True)
class Heartbeat(Message):
    seq: int
    VERB: ClassVar[str] = "HB"
    DIRECTION: ClassVar[str] = "to_gate"


@dataclass(frozen=True)
class Reject(Message):
    seq: int
    part: str
    gate: int
    at: str             # "d<ms>" or "e<count>"
    pulse_ms: int
    VERB: ClassVar[str] = "REJ"
    DIRECTION: ClassVar[str] = "to_gate"

    @property
    def at_kind(self) -> str:
        return self.at[0]

    @property
    def at_value(self) -> int:
        return int(self.at[1:])


@dataclass(frozen=True)
class Accept(Message):
    seq: int
    part: str
    VERB: ClassVar[str] = "ACC"
    DIRECTION: ClassVar[str] = "to_gate"


@dataclass(frozen=True)
class Config(Message):
    seq: int
    key: str
    value: str
    VERB: ClassVar[str] = "CFG"
    DIRECTION: ClassVar[str] = "to_gate"


# gate -> host

@dataclass(frozen=True)
class HelloReply(Message):
    fw: str
    proto: int
    VERB: ClassVar[str] = "HELLO"
    DIRECTION: ClassVar[str] = "to_host"


@dataclass(frozen=True)
class Ack(Message):
    seq: int
    VERB: ClassVar[str] = "ACK"
    DIRECTION: ClassVar[str] = "to_host"


@dataclass(frozen=True)
class Nak(Message):
    seq: int
    code: str
    VERB: ClassVar[str] = "NAK"
    DIRECTION: ClassVar[str] = "to_host"


@dataclass(frozen=True)
class Fired(Message):
    part: str
    gate: int
    t_ms: int
    VERB: ClassVar[str] = "FIRED"
    DIRECTION: ClassVar[str] = "to_host"


@dataclass(frozen=True)
class Trigger(Message):
    part: str
    encoder: int
    VERB: ClassVar[str] = "TRG"
    DIRECTION: ClassVar[str] = "to_host"


@dataclass(frozen=True)
class Fault(Message):
    code: str
    text: str = ""
    VERB: ClassVar[str] = "FAULT"
    DIRECTION: ClassVar[str] = "to_host"

    def encode(self) -> bytes:
        return encode(self.VERB, self.code, text=self.text)


# NAK codes (docs/serial-protocol.md section "NAK codes")
NAK_CODES = {
    "BADARG": "a field is malformed or out of range",
    "BADGATE": "no such gate output",
    "BADKEY": "CFG key unknown or value invalid",
    "FULL": "the pulse schedule is full",
    "LATE": "target too far in the past to be meaningful (beyond the late window)",
    "FAILSAFE": "the gate is in fail-safe and refuses the command",
    "UNSUP": "verb or mode (e.g. encoder targets) not supported by this controller",
}


# ---------------------------------------------------------------------------- decode


def _uint(s: str) -> int:
    if not _UINT_RE.match(s):
        raise ValueError(f"not an unsigned integer: {s!r}")
    v = int(s)
    if v >= 2**32:
        raise ValueError(f"out of uint32 range: {s!r}")
    return v


def _int(s: str) -> int:
    if not _INT_RE.match(s):
        raise ValueError(f"not an integer: {s!r}")
    return int(s)


def _token(s: str) -> str:
    if len(s) > MAX_TOKEN:
        raise ValueError(f"token longer than {MAX_TOKEN}: {s[:40]!r}")
    return s


def _at(s: str) -> str:
    if not _AT_RE.match(s) or int(s[1:]) >= 2**32:
        raise ValueError(f"bad target {s!r}: want d<ms> or e<count>")
    return s


# verb -> (class, field converters); the FAULT tail is handled separately
_TO_GATE = {
    "HELLO": (Hello, ()),
    "HB": (Heartbeat, (_uint,)),
    "REJ": (Reject, (_uint, _token, _uint, _at, _uint)),
    "ACC": (Accept, (_uint, _token)),
    "CFG": (Config, (_uint, _token, _token)),
}
_TO_HOST = {
    "HELLO": (HelloReply, (_token, _uint)),
    "ACK": (Ack, (_uint,)),
    "NAK": (Nak, (_uint, _token)),
    "FIRED": (Fired, (_token, _uint, _uint)),
    "TRG": (Trigger, (_token, _int)),
    "FAULT": (Fault, None),
}

ERROR_KINDS = ("bad_checksum", "garbage", "unknown_verb", "overlong", "bad_fields")


class LineError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def decode_line(line: bytes, direction: Literal["to_host", "to_gate"] = "to_host") -> Message:
    """One line (without or with its trailing newline) -> Message, or raise LineError."""
    line = line.rstrip(b"\r\n")
    if len(line) + 1 > MAX_LINE:
        raise LineError("overlong", f"{len(line) + 1} bytes")
    star = line.rfind(b"*")
    if star < 0 or len(line) - star != 5:
        raise LineError("garbage", f"no '*XXXX' trailer: {line[:60]!r}")
    body, crc_txt = line[:star], line[star + 1:]
    if not body or any(c < 0x20 or c > 0x7E for c in body):
        raise LineError("garbage", f"non-printable or empty body: {line[:60]!r}")
    try:
        crc = int(crc_txt.decode("ascii"), 16)
        if crc_txt.upper() != crc_txt:
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise LineError("garbage", f"bad CRC field {crc_txt!r}") from None
    if crc != crc16_ccitt_false(body):
        raise LineError("bad_checksum",
                        f"{line[:60]!r}: got {crc:04X}, want {crc16_ccitt_false(body):04X}")
    text = body.decode("ascii")
    table = _TO_HOST if direction == "to_host" else _TO_GATE
    verb, _, rest = text.partition(" ")
    if verb not in table:
        raise LineError("unknown_verb", verb[:40])
    cls, conv = table[verb]
    if conv is None:        # FAULT <code> <free text>
        code, _, tail = rest.partition(" ")
        if not code:
            raise LineError("bad_fields", f"FAULT without code: {text!r}")
        return Fault(code=code, text=tail.strip())
    args = rest.split(" ") if rest else []
    if len(args) != len(conv):
        raise LineError("bad_fields", f"{verb} wants {len(conv)} fields, got {len(args)}: {text!r}")
    try:
        values = [c(a) for c, a in zip(conv, args)]
    except ValueError as exc:
        raise LineError("bad_fields", f"{text!r}: {exc}") from None
    return cls(*values)


class LineParser:
    """Feed it byte chunks; it yields Messages and counts errors in ``.errors``.

    Handles partial lines across chunks, NUL/garbage bytes, CR LF endings and lines
    longer than MAX_LINE (the excess is discarded up to the next newline and the line
    counted once as "overlong"). Never raises on input."""

    def __init__(self, direction: Literal["to_host", "to_gate"] = "to_host",
                 max_line: int = MAX_LINE, name: str = ""):
        self.direction = direction
        self.max_line = max_line
        self.name = name
        self._buf = bytearray()
        self._discarding = False
        self.errors: dict[str, int] = {k: 0 for k in ERROR_KINDS}
        self.lines_ok = 0

    def _error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        log.debug("%s line error %s: %s", self.name or "serial", kind, detail)

    def feed(self, data: bytes) -> list[Message]:
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[Message]:
        start = 0
        n = len(data)
        while start < n:
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            if self._discarding:
                if nl < 0:
                    return
                self._discarding = False
                start = nl + 1
                continue
            if len(self._buf) + len(chunk) + 1 > self.max_line:
                self._error("overlong", f"> {self.max_line} bytes")
                self._buf.clear()
                if nl < 0:
                    self._discarding = True
                    return
                start = nl + 1
                continue
            self._buf += chunk
            if nl < 0:
                return
            start = nl + 1
            line = bytes(self._buf)
            self._buf.clear()
            line = line.rstrip(b"\r")
            if not line.strip(b"\x00 \r\t"):
                continue            # empty line: ignore silently
            try:
                msg = decode_line(line, self.direction)
            except LineError as exc:
                self._error(exc.kind, exc.detail)
                continue
            self.lines_ok += 1
            yield msg

    def reset(self) -> None:
        """Forget a partial line (after a reconnect); keeps the counters."""
        self._buf.clear()
        self._discarding = False

    def total_errors(self) -> int:
        return sum(self.errors.values())
