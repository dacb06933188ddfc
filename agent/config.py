"""The one TOML config, validated into typed objects with field-level errors.

Every problem becomes one line '<section>.<key>: <what is wrong>' so a plant engineer can
fix the file without reading Python tracebacks. `check-config` prints them and exits 2.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import stat
import sys
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .trigger_config import TRIGGER_MODES, FrameTrigger, TriggerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(Exception):
    """Raised with a list of one-line problems."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _milliseconds(v: Optional[float], example: float) -> Optional[float]:
    # Under 1 ms is never a real deadline or travel time; it is seconds typed into a
    # millisecond field, and it would make every part FAILSAFE.
    if v is not None and v < 1:
        raise ValueError(f"{v:g} ms is under 1 ms; the value is in milliseconds "
                         f"(e.g. {example:g} for {example / 1000:g} s)")
    return v


def _not_empty(v):
    # Path("") is ".", the working directory: an empty path would silently name a folder.
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty; name a path")
    return v


# Stream URL schemes OpenCV's FFmpeg backend opens; anything else is a typo (rtps://).
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "rtp",
                  "srt", "file")

# The reference gate firmware's fail-safe timeout without a heartbeat (CFG hb_timeout_ms,
# docs/serial-protocol.md section 7); the host's heartbeat must come well within it.
FIRMWARE_HB_TIMEOUT_MS = 2000


class Station(_Section):
    id: str = Field("station-1", min_length=1, max_length=64)

    @field_validator("id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError("use only letters, digits, '.', '_' and '-' (it is part of MQTT topics)")
        return v


class Camera(_Section):
    # A device path (/dev/video0) or index (0), an rtsp:// or http(s):// URL, a video file,
    # or a folder of images.
    source: Union[int, str] = 0
    fps: float = Field(0.0, ge=0, le=1000, description="0 = as fast as the source delivers")
    loop: bool = False
    width: Optional[int] = Field(None, gt=0)
    height: Optional[int] = Field(None, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0, le=600)
    stall_timeout_s: float = Field(5.0, gt=0, le=600)

    @field_validator("source")
    @classmethod
    def _source(cls, v):
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("is empty; name a device (/dev/video0 or 0), an rtsp:// or "
                                 "http:// URL, a video file or an image folder")
            m = re.match(r"^([a-z][a-z0-9+.-]*)://", v, re.I)
            if m and m.group(1).lower() not in STREAM_SCHEMES:
                typed = m.group(1).lower()
                # swapped letters (rtps) first: difflib alone would offer rtsps
                near = [s for s in STREAM_SCHEMES if sorted(s) == sorted(typed)] or \
                    difflib.get_close_matches(typed, STREAM_SCHEMES, n=1)
                hint = f"did you mean '{near[0]}://'?" if near else \
                    f"known: {', '.join(s + '://' for s in STREAM_SCHEMES)}"
                raise ValueError(f"unknown stream scheme '{m.group(1)}://' ({hint})")
        return v


class Model(_Section):
    bundle: Path = Path("/var/lib/edge-inspect/models/current")
    threshold: Optional[float] = Field(None, ge=0, le=1, description="overrides the bundle's")
    # Mirror views scored per tile, at most the bundle's: 4 views cost 4 model runs a frame.
    # A box that cannot keep up sets 1 or 2 and decides at the threshold the trainer chose
    # for that many (the bundle's by_views table), not the one chosen for all of them.
    views: Optional[Literal[1, 2, 4]] = Field(None, description="views per tile (default: the bundle's)")
    delegate: Literal["cpu", "edgetpu"] = "cpu"
    device: Optional[str] = None
    cpu_fallback: bool = False
    threads: int = Field(2, ge=1, le=64)
    # Inspect threads, each with its own interpreter. On a 2-core box, workers = 2 with
    # threads = 1 outruns one 2-thread interpreter (edge-inspect bench measures it).
    workers: int = Field(1, ge=1, le=16)

    @field_validator("device")
    @classmethod
    def _tpu_device(cls, v):
        if v is not None and not re.fullmatch(r"(usb|pci)(:\d+)?|:\d+", v):
            raise ValueError("Edge TPU device must look like 'usb', 'usb:0', 'pci:0' or ':0'")
        return v

    _bundle_set = field_validator("bundle", mode="before")(_not_empty)


class Inspection(_Section):
    deadline_ms: float = Field(250.0, gt=0, le=60_000)
    failsafe: Literal["reject", "pass"] = "reject"
    queue_size: int = Field(4, ge=1, le=256)

    @field_validator("deadline_ms")
    @classmethod
    def _ms(cls, v):
        return _milliseconds(v, 250)


class Gate(_Section):
    kind: Literal["serial", "modbus", "mqtt", "none"] = "none"
    port: Optional[str] = None
    baud: int = Field(115200, gt=0)
    gate: int = Field(1, ge=1, le=99)
    delay_ms: Optional[float] = Field(None, gt=0, le=600_000)
    encoder_offset: Optional[int] = Field(None, ge=0)
    pulse_ms: int = Field(50, ge=1, le=10_000)
    ack_timeout_ms: int = Field(100, ge=5, le=10_000)
    retries: int = Field(3, ge=0, le=20)
    heartbeat_ms: int = Field(500, ge=50, le=60_000)
    modbus_slave: int = Field(1, ge=1, le=247)
    modbus_address: int = Field(0, ge=0, le=65535)
    modbus_target: Literal["coil", "register"] = "coil"

    @field_validator("delay_ms")
    @classmethod
    def _ms(cls, v):
        return _milliseconds(v, 800)

    @property
    def mode(self) -> str:
        return "encoder" if self.encoder_offset is not None else "time"


class Mqtt(_Section):
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

    _outbox_set = field_validator("outbox", mode="before")(_not_empty)


class Metrics(_Section):
    port: int = Field(9108, ge=0, le=65535, description="0 turns the Prometheus endpoint off")
    bind: str = "127.0.0.1"


class Recorder(_Section):
    enabled: bool = True
    dir: Path = Path("/var/lib/edge-inspect/images")
    max_mb: float = Field(2048, gt=0)
    # The recorder never lets its disk's free space fall below this: it deletes its oldest
    # images first, and stops saving when that is not enough (alerts come first).
    min_free_mb: float = Field(256, ge=0)
    pass_sample: float = Field(0.01, ge=0, le=1, description="share of PASS parts also saved")

    _dir_set = field_validator("dir", mode="before")(_not_empty)


class Ui(_Section):
    """The operator page (agent/ui/): off the inspect path, local unless configured."""
    port: int = Field(0, ge=0, le=65535, description="0 turns the operator page off")
    bind: str = "127.0.0.1"
    # Anywhere but loopback the page needs this token (HTTP Basic password or Bearer).
    token_file: Optional[Path] = None
    # Pause / resume / threshold from the page; read-only without it.
    control: bool = False
    rejects: int = Field(24, ge=1, le=500, description="rejects kept for the gallery")
    live_fps: float = Field(4.0, gt=0, le=30, description="live view refresh")

    @property
    def loopback(self) -> bool:
        return self.bind in ("127.0.0.1", "localhost", "::1") or self.bind.startswith("127.")


class FrameChecks(_Section):
    """Frame sanity checks before inference (agent/frame_checks.py): a part whose frame
    is blank, frozen or far from the training images is FAILSAFE, never judged."""
    enabled: bool = True
    uniform_std: float = Field(2.0, ge=0, le=128, description="grey-level std below which "
                               "a frame is blank")
    frozen_frames: int = Field(2, ge=0, le=1000, description="identical frames in a row that "
                               "make the stream frozen (0: off)")
    stats: bool = Field(True, description="compare with the bundle's input_stats")
    stats_sigmas: float = Field(4.0, gt=0, le=100)

    def settings(self):
        from .frame_checks import FrameCheckSettings

        return FrameCheckSettings(enabled=self.enabled, uniform_std=self.uniform_std,
                                  frozen_frames=self.frozen_frames, stats=self.stats,
                                  stats_sigmas=self.stats_sigmas)


class Log(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Section):
    station: Station = Station()
    camera: Camera = Camera()
    model: Model = Model()
    inspection: Inspection = Inspection()
    gate: Gate = Gate()
    mqtt: Mqtt = Mqtt()
    metrics: Metrics = Metrics()
    recorder: Recorder = Recorder()
    frame_checks: FrameChecks = FrameChecks()
    ui: Ui = Ui()
    log: Log = Log()
    trigger: TriggerConfig = FrameTrigger()

    @model_validator(mode="after")
    def _combinations(self):
        problems = combination_problems(dict(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self


def combination_problems(s: dict) -> list[str]:
    """Rules across fields and sections, one line each. `s` maps section names to validated
    sections; a section that failed its own checks is absent and its rules are skipped, so
    a typo in one section never hides an impossible combination in another."""
    out: list[str] = []
    g, m, insp, model, metrics = (s.get(k) for k in ("gate", "mqtt", "inspection", "model",
                                                      "metrics"))
    if g is not None:
        if g.delay_ms is not None and g.encoder_offset is not None:
            out.append("gate: set delay_ms (time mode) or encoder_offset (encoder mode), not both")
        elif g.kind != "none" and g.delay_ms is None and g.encoder_offset is None:
            out.append(f"gate: a {g.kind} gate needs delay_ms (time mode) or encoder_offset "
                       "(encoder mode) to know when the part reaches it")
        if g.kind in ("serial", "modbus") and not g.port:
            out.append(f"gate.port: a {g.kind} gate needs the serial port (e.g. /dev/ttyUSB0)")
        if g.encoder_offset is not None and g.kind != "serial":
            out.append(f"gate.encoder_offset: encoder mode needs a gate controller that "
                       f"counts the encoder (kind = 'serial'), not {g.kind!r}")
        if g.kind == "serial" and g.heartbeat_ms >= FIRMWARE_HB_TIMEOUT_MS:
            out.append(f"gate.heartbeat_ms: {g.heartbeat_ms} ms is not shorter than the gate "
                       f"firmware's heartbeat timeout ({FIRMWARE_HB_TIMEOUT_MS} ms): the gate "
                       "would divert every part as if the host were gone")
    ui = s.get("ui")
    if ui is not None and ui.port and not ui.loopback and ui.token_file is None:
        out.append(f"ui.token_file: the operator page is bound to {ui.bind}, beyond this box: "
                   "it needs a token file (or bind = \"127.0.0.1\")")
    if ui is not None and metrics is not None and ui.port and ui.port == metrics.port:
        out.append(f"ui.port: {ui.port} is also metrics.port")
    if model is not None and model.workers > 1 and model.delegate != "cpu":
        out.append("model.workers: several inspect workers need delegate = 'cpu' "
                   "(one Edge TPU serves one interpreter)")
    if g is not None and m is not None and g.kind == "mqtt" and not m.enabled:
        out.append("gate.kind: an mqtt gate needs [mqtt] enabled = true")
    late = False
    if g is not None and insp is not None and g.delay_ms is not None \
            and g.delay_ms <= insp.deadline_ms:
        late = True
        out.append(f"gate.delay_ms: {g.delay_ms:g} ms is not longer than "
                   f"inspection.deadline_ms ({insp.deadline_ms:g} ms): the part "
                   "would reach the gate before its verdict")
    if g is not None and not late and g.kind == "serial" and g.delay_ms is not None \
            and g.retries and g.ack_timeout_ms * g.retries > g.delay_ms:
        out.append(f"gate.retries: the last resend of an unanswered reject would leave "
                   f"{g.ack_timeout_ms * g.retries} ms (ack_timeout_ms {g.ack_timeout_ms} x "
                   f"retries {g.retries}) after the first, when the part is past the gate "
                   f"(delay_ms {g.delay_ms:g}); lower retries or ack_timeout_ms")
    out += _trigger_problems(s)
    if m is not None:
        if (m.cert_file is None) != (m.key_file is None):
            out.append("mqtt: cert_file and key_file go together (client certificate)")
        if (m.ca_file or m.cert_file) and not m.tls:
            out.append("mqtt.tls: ca_file/cert_file are set but tls = false")
        if m.password_file and not m.username:
            out.append("mqtt.username: password_file is set but username is not")
        if metrics is not None and metrics.port and m.enabled and metrics.port == m.port \
                and m.host in ("127.0.0.1", "localhost"):
            out.append(f"metrics.port: {metrics.port} is the local MQTT broker's port")
    return out


def _trigger_problems(s: dict) -> list[str]:
    t, g, m, insp, cam = (s.get(k) for k in ("trigger", "gate", "mqtt", "inspection", "camera"))
    out: list[str] = []
    if t is None or t.mode == "frame":
        return out
    if g is not None and g.mode == "encoder":
        out.append(f"trigger.mode: {t.mode!r} times parts by clock; encoder timing "
                   "(gate.encoder_offset) latches a count per TRG frame: use gate.delay_ms")
    if t.mode == "external":
        if t.source == "serial" and g is not None and g.kind != "serial":
            out.append("trigger.source: 'serial' triggers come from the gate controller's TRG "
                       f"(gate.kind = 'serial'), not {g.kind!r}")
        if t.source == "mqtt" and m is not None and not m.enabled:
            out.append("trigger.source: 'mqtt' triggers need [mqtt] enabled = true")
        if t.source == "modbus" and g is not None and g.kind != "modbus":
            out.append("trigger.source: 'modbus' polls the Modbus gate's discrete input "
                       "(gate.kind = 'modbus')")
        if insp is not None and t.offset_ms + t.window_ms >= insp.deadline_ms:
            out.append(f"trigger.offset_ms: offset {t.offset_ms:g} + window {t.window_ms:g} ms "
                       f"is not inside inspection.deadline_ms ({insp.deadline_ms:g} ms): "
                       "every part would be past its deadline before its frame arrives")
    if cam is not None and isinstance(cam.source, str) and not cam.source.startswith("/dev/") \
            and not _is_url(cam.source) and not cam.source.isdigit() and not cam.fps:
        out.append(f"camera.fps: trigger mode {t.mode!r} on a file or folder needs camera.fps "
                   "(frames paced as the camera would deliver them, so frame times are line times)")
    return out


_PATH_FIELDS = {
    ("model", "bundle"), ("mqtt", "password_file"), ("mqtt", "ca_file"), ("mqtt", "cert_file"),
    ("mqtt", "key_file"), ("mqtt", "outbox"), ("recorder", "dir"), ("ui", "token_file"),
}


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths in the file are relative to the file, not to the working directory."""
    for section, key in _PATH_FIELDS:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key].strip():
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else base / p)
    cam = raw.get("camera")
    if isinstance(cam, dict) and isinstance(cam.get("source"), str):
        src = cam["source"]
        if src.strip() and not _is_url(src) and not src.startswith("/dev/") and not src.isdigit():
            p = Path(src).expanduser()
            cam["source"] = str(p if p.is_absolute() else base / p)


def _is_url(s: str) -> bool:
    """scheme://... (rtsp://, http://, spy://, socket://): a URL, not a path. The one definition."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I))


def _model_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        f = model.model_fields.get(part)
        if f is None or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            break
        model = f.annotation
    return list(model.model_fields)


def _format(e: ValidationError, prefix: tuple = (), root: type[BaseModel] | None = None) -> list[str]:
    out = []
    for err in e.errors():
        loc = prefix + tuple(str(p) for p in err["loc"])
        where = ".".join(loc) or "config"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = (list(root.model_fields) if root is not None
                     else _model_fields(Config, loc[:-1]))
            near = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"
            out.append(f"{where}: unknown key{hint}")
        elif kind == "value_error":
            msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            # model-level messages already start with their field
            out.append(msg if not loc else f"{where}: {msg}")
        elif kind == "literal_error":
            out.append(f"{where}: {err['input']!r} is not one of {err['ctx']['expected']}")
        else:
            out.append(f"{where}: {err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})")
    return out


def print_problems(problems: list[str]) -> int:
    """One 'error: …' line per problem on stderr; returns 2, the exit code for them."""
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 2


def parse_config(raw: dict, base: Path = Path(".")) -> Config:
    """Every problem in the file at once: each section is validated on its own, then the
    rules across sections run on the sections that passed."""
    _resolve_paths(raw, base)
    problems: list[str] = []
    known = list(Config.model_fields)
    for key in raw:
        if key not in Config.model_fields:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"
            problems.append(f"{key}: unknown key{hint}")
    sections = {}
    for name, field in Config.model_fields.items():
        if name == "trigger":
            problems += _parse_trigger(raw.get(name, {}), sections)
            continue
        try:
            sections[name] = field.annotation.model_validate(raw.get(name, {}))
        except ValidationError as e:
            problems += _format(e, (name,))
    problems += combination_problems(sections)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def _parse_trigger(raw, sections: dict) -> list[str]:
    """[trigger] is a union discriminated by `mode`: pick the mode's model first, so an
    error names the mode's own keys rather than pydantic's tagged location."""
    if not isinstance(raw, dict):
        return ["trigger: must be a table ([trigger])"]
    mode = raw.get("mode", "frame")
    cls = TRIGGER_MODES.get(mode) if isinstance(mode, str) else None
    if cls is None:
        return [f"trigger.mode: {mode!r} is not one of {tuple(TRIGGER_MODES)}"]
    try:
        sections["trigger"] = cls.model_validate(raw)
    except ValidationError as e:
        return _format(e, ("trigger",), root=cls)
    return []


def check_environment(cfg: Config, strict_devices: bool = True) -> list[str]:
    """What exists on this machine: files, folders, devices. Not part of the schema so a
    config can be validated on a workstation with strict_devices=False."""
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
    if cfg.gate.kind == "serial" and cfg.gate.port and _is_url(cfg.gate.port):
        pass        # a pyserial URL (spy://, socket://, rfc2217://): checked when the gate opens it
    elif cfg.gate.kind in ("serial", "modbus") and cfg.gate.port:
        port = cfg.gate.port
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


def _tls_problems(m: Mqtt) -> list[str]:
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


def load_config(path: str | Path, check_env: bool = True, strict_devices: bool = True) -> Config:
    """Read, validate and (by default) check the environment. Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    cfg = parse_config(raw, path.resolve().parent)
    if check_env:
        problems = check_environment(cfg, strict_devices)
        if problems:
            raise ConfigError(problems)
    return cfg


def summary(cfg: Config) -> str:
    g, m = cfg.gate, cfg.mqtt
    timing = (f"encoder +{g.encoder_offset}" if g.mode == "encoder"
              else f"{g.delay_ms or 0:g} ms after capture")
    lines = [
        f"station   {cfg.station.id}",
        f"camera    {cfg.camera.source} (fps {'source' if not cfg.camera.fps else cfg.camera.fps})",
        f"model     {cfg.model.bundle} on {cfg.model.delegate}"
        f"{' (cpu fallback)' if cfg.model.cpu_fallback else ''}, threshold "
        f"{'from bundle' if cfg.model.threshold is None else cfg.model.threshold}, views "
        f"{'from bundle' if cfg.model.views is None else cfg.model.views}",
        f"deadline  {cfg.inspection.deadline_ms:g} ms, uninspected parts: {cfg.inspection.failsafe}",
        f"gate      {g.kind}" + ("" if g.kind == "none" else f" {g.port or ''} fires {timing}, "
                                 f"pulse {g.pulse_ms} ms"),
        "mqtt      " + (f"{m.host}:{m.port} prefix {m.prefix}/{cfg.station.id}"
                         f"{' tls' if m.tls else ''}, outbox {m.outbox}" if m.enabled else "off"),
        "metrics   " + (f"http://{cfg.metrics.bind}:{cfg.metrics.port}/metrics"
                         if cfg.metrics.port else "off"),
        "recorder  " + (f"{cfg.recorder.dir} (max {cfg.recorder.max_mb:g} MB)"
                         if cfg.recorder.enabled else "off"),
        f"trigger   {cfg.trigger.describe()}",
    ]
    return "\n".join(lines)
