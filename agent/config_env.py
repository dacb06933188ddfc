"""What exists on this machine for a config: files, folders, devices, certificates.

Not part of the schema, so a config can be validated on a workstation
(``strict_devices=False``: a device that is not plugged in here is not a problem).
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from firmware_io.mqtt_config import MqttConfig

from agent.config_rules import is_url as _is_url

if TYPE_CHECKING:
    from agent.config import Config


def check_environment(cfg: Config, strict_devices: bool = True) -> list[str]:
    """One line per file, folder or device the config names that is not what it must be."""
    problems = []
    b = cfg.model.bundle
    if not b.exists():
        problems.append(f"model.bundle: {b} does not exist")
    elif not (b / "bundle.json").is_file():
        problems.append(f"model.bundle: {b} has no bundle.json (not a model bundle)")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        p = getattr(cfg.mqtt, key)
        if cfg.mqtt.enabled and p is not None and not p.is_file():
            problems.append(f"mqtt.{key}: {p} " + ("is a directory, not a file" if p.is_dir()
                                                   else "does not exist"))
        elif cfg.mqtt.enabled and p is not None and not os.access(p, os.R_OK):
            problems.append(f"mqtt.{key}: {p} cannot be read by this user")
    if cfg.mqtt.enabled and cfg.mqtt.tls:
        problems += _tls_problems(cfg.mqtt)
    src = cfg.camera.source
    if isinstance(src, str) and not _is_url(src) and not src.isdigit():
        if src.startswith("/dev/"):
            if strict_devices and not os.path.exists(src):
                problems.append(f"camera.source: device {src} does not exist (camera unplugged?)")
        elif not os.path.exists(src):
            problems.append(f"camera.source: {src} does not exist (expected a device, URL, "
                            "video file or image folder)")
    port = getattr(cfg.gate, "port", None)
    if cfg.gate.kind == "serial" and port and _is_url(port):
        pass        # a pyserial URL (spy://, socket://, rfc2217://): checked when the gate opens it
    elif port:
        if not os.path.exists(port):
            if strict_devices:
                problems.append(f"gate.port: {port} does not exist (serial adapter unplugged?)")
        else:
            # Never opened here: opening a USB serial adapter toggles DTR, which resets many
            # controllers, and the running daemon may hold it. A character device that is
            # not a memory device (/dev/null, /dev/zero: major 1) is as far as we can tell.
            st = os.stat(port)
            if not stat.S_ISCHR(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file"
                problems.append(f"gate.port: {port} is {kind}, not a serial device "
                                "(e.g. /dev/ttyUSB0, /dev/serial/by-id/…)")
            elif os.major(st.st_rdev) == 1:
                problems.append(f"gate.port: {port} is not a serial port (a memory device "
                                "swallows every reject); name the adapter, e.g. /dev/ttyUSB0")
    t = cfg.ui.token_file
    if cfg.ui.port and t is not None:
        if not t.is_file():
            problems.append(f"ui.token_file: {t} " + ("is a directory, not a file" if t.is_dir()
                                                     else "does not exist"))
        elif not os.access(t, os.R_OK):
            problems.append(f"ui.token_file: {t} cannot be read by this user")
        elif not t.read_text(errors="replace").strip():
            problems.append(f"ui.token_file: {t} is empty")
    if cfg.recorder.enabled and cfg.recorder.dir.exists() and not cfg.recorder.dir.is_dir():
        problems.append(f"recorder.dir: {cfg.recorder.dir} is a file, not a folder")
    if cfg.mqtt.enabled:
        problems += _outbox_problems(cfg.mqtt.outbox)
    for key, p in (("recorder.dir", cfg.recorder.dir if cfg.recorder.enabled else None),
                   ("mqtt.outbox", cfg.mqtt.outbox.parent if cfg.mqtt.enabled else None)):
        if p is None:
            continue
        anc = p
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not os.access(anc, os.W_OK):
            problems.append(f"{key}: {p} cannot be created or written (no write access to {anc})")
    return problems


def _tls_problems(m: MqttConfig) -> list[str]:
    """Load the CA and client certificate as the MQTT link will, so a file that is not a
    certificate is one line here rather than an ssl traceback at start."""
    out = []
    ctx = ssl.create_default_context()
    if m.ca_file is not None and m.ca_file.is_file():
        try:
            ctx.load_verify_locations(cafile=str(m.ca_file))
        except (ssl.SSLError, ValueError) as e:
            out.append(f"mqtt.ca_file: {m.ca_file} is not a PEM CA certificate ({e})")
    if m.cert_file is not None and m.key_file is not None and m.cert_file.is_file() \
            and m.key_file.is_file():
        try:
            ctx.load_cert_chain(str(m.cert_file), str(m.key_file))
        except (ssl.SSLError, ValueError) as e:
            out.append(f"mqtt.cert_file: {m.cert_file} with {m.key_file} is not a PEM "
                       f"certificate and its key ({e})")
    return out


def _outbox_problems(outbox: Path) -> list[str]:
    if outbox.is_dir():
        return [f"mqtt.outbox: {outbox} is a directory; name the SQLite file inside it "
                f"(e.g. {outbox / 'outbox.sqlite'})"]
    if outbox.is_file() and outbox.stat().st_size:
        try:
            with open(outbox, "rb") as f:
                head = f.read(16)
        except OSError as e:
            return [f"mqtt.outbox: {outbox} cannot be read: {e.strerror}"]
        if head != b"SQLite format 3\x00":
            return [f"mqtt.outbox: {outbox} is not an SQLite database (the outbox file); "
                    "move it away or name another file"]
    return []


def config_warnings(cfg: Config) -> list[str]:
    """Things that run but should not stay so; check-config and run print them."""
    out = []
    p = cfg.mqtt.password_file
    if cfg.mqtt.enabled and p is not None and p.is_file() and p.stat().st_mode & 0o004:
        out.append(f"mqtt.password_file: {p} is readable by every user on this box "
                   f"(chmod 600 {p}, or 640 with group edge-inspect)")
    t = cfg.ui.token_file
    if cfg.ui.port and t is not None and t.is_file() and t.stat().st_mode & 0o004:
        out.append(f"ui.token_file: {t} is readable by every user on this box (chmod 600 {t})")
    return out


