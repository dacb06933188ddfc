"""``[mqtt]``: the MQTT link's own config model (firmware_io.mqtt_link builds from it).

Apart from mqtt_link so it validates where paho-mqtt is not installed (a workstation
checking a plant's config). Its rules across keys are ``checks()`` (firmware_io.checked).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .checked import Checked, not_empty


class MqttConfig(Checked):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = "edge-inspect"
    username: Optional[str] = None
    password_file: Optional[Path] = None
    tls: bool = False
    ca_file: Optional[Path] = None
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    outbox: Path = Path("/var/lib/edge-inspect/outbox.sqlite")
    outbox_max: int = Field(100_000, ge=100)
    # Disk space kept for alerts: a preallocated file beside the outbox, released when the
    # disk fills so alerts are still stored (firmware_io/outbox.py). 0 turns it off.
    outbox_reserve_mb: float = Field(16, ge=0, le=4096)
    commands: bool = False
    publish_results: bool = False
    metrics_interval_s: float = Field(10.0, gt=0, le=3600)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/") \
                or "//" in v or any(c.isspace() for c in v) or v.startswith("$"):
            raise ValueError("must be a plain topic prefix like 'edge-inspect' or 'plant/line1': "
                             "no spaces, '#', '+', leading '$', empty levels ('a//b') or "
                             "leading/trailing '/'")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        # paho takes a bare host; "tcp://h:1883" would be looked up as a host name and fail
        # in the background, forever "connecting".
        if "://" in v or re.fullmatch(r"[^:\[\]]+:\d+", v) or not v.strip() or " " in v:
            raise ValueError(f"{v!r} is not a host name or address: write the host alone "
                             "(e.g. host = \"broker.local\") and the port in mqtt.port")
        return v

    _outbox_set = field_validator("outbox", mode="before")(not_empty)

    @property
    def outbox_reserve_bytes(self) -> int:
        return int(self.outbox_reserve_mb * 1024 * 1024)

    def password(self) -> Optional[str]:
        """The password, read from password_file now (OSError when it cannot be read)."""
        return self.password_file.read_text().strip() if self.password_file else None

    # -- rules across keys ------------------------------------------------------------
    def checks(self):
        return [self._client_cert_pair, self._tls_files_need_tls, self._password_needs_user]

    def _client_cert_pair(self):
        if (self.cert_file is None) != (self.key_file is None):
            return "", "cert_file and key_file go together (client certificate)"

    def _tls_files_need_tls(self):
        if (self.ca_file or self.cert_file) and not self.tls:
            return "tls", "ca_file/cert_file are set but tls = false"

    def _password_needs_user(self):
        if self.password_file and not self.username:
            return "username", "password_file is set but username is not"


class LinkTuning(BaseModel):
    """How the link behaves, not what it connects to: set by code that embeds it (tests,
    benchmarks), never by the config file (the agent always runs the defaults)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    # FULL: an alert is on disk before publish_alert returns (NORMAL survives a killed
    # process but not a power cut)
    outbox_sync: Literal["NORMAL", "FULL"] = "FULL"
    keepalive: int = Field(30, ge=5, le=3600)
    client_id: Optional[str] = None
    inflight_window: int = Field(100, ge=1, le=65535, description="alerts handed to the "
                                 "broker, not yet PUBACKed")
    inflight_timeout_s: float = Field(60.0, gt=0, description="connected yet no PUBACK this "
                                      "long: send again")
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

