"""Who may look: nobody but this box on loopback, or whoever has the token.

The token comes from a file (like mqtt.password_file), and is accepted as
`Authorization: Bearer <token>` or as the password of HTTP Basic (any user name, which
then names the reviewer): a browser asks for Basic by itself, so the page needs no login
form and no cookies.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Caller:
    ok: bool
    user: str | None = None     # the Basic user name, when one was given


def read_token(path: str | Path | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def check(header: str | None, token: str | None) -> Caller:
    if token is None:
        return Caller(True)
    if not header:
        return Caller(False)
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return Caller(hmac.compare_digest(value.encode(), token.encode()))
    if scheme.lower() == "basic":
        try:
            user, _, pw = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return Caller(False)
        if hmac.compare_digest(pw.encode(), token.encode()):
            return Caller(True, user or None)
    return Caller(False)
