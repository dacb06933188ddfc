"""The one TOML config, validated into typed objects with field-level errors.

Every problem becomes one line '<section>.<key>: <what is wrong>' so a plant engineer can
fix the file without reading Python tracebacks; all of them at once, field errors and the
rules across keys and sections together. `check-config` prints them and exits 2.

The sections the plant side owns are firmware_io's models: ``[gate]`` is the union of the
gate backends' configs (firmware_io.gates, discriminated by ``kind``), ``[mqtt]`` is
firmware_io.mqtt_config.MqttConfig. This module composes them with the agent's own.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from firmware_io.checked import DEFER_CHECKS, Checked, not_empty
from firmware_io.commands import Threshold
from firmware_io.gates import GATE_KINDS, GateConfig, NoneGateConfig
from firmware_io.mqtt_config import MqttConfig
from firmware_io.timing import whole_ms

from agent.config_env import check_environment, config_warnings  # noqa: F401 (the API is here)
from agent.config_rules import RULES, SUPERSEDES, run_checks
from agent.config_rules import is_url as _is_url
from agent.trigger_config import TRIGGER_MODES, FrameTrigger, TriggerConfig

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


# Stream URL schemes OpenCV's FFmpeg backend opens; anything else is a typo (rtps://).
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "rtp",
                  "srt", "file")

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
    threshold: Optional[Threshold] = Field(None, description="overrides the bundle's")
    # Mirror views scored per tile, at most the bundle's: 4 views cost 4 model runs a frame.
    # A box that cannot keep up sets 1 or 2 and decides at the threshold the trainer chose
    # for that many (the bundle's by_views table), not the one chosen for all of them.
    views: Optional[Literal[1, 2, 4]] = Field(None, description="views per tile (default: the bundle's)")
    # cpu: LiteRT + XNNPACK; edgetpu: a Coral; tensorrt / cuda / onnx-cpu: ONNX Runtime on the
    # bundle's model.onnx (agent.runtime.engines.onnxrt; the `onnx` extra, or NVIDIA's wheel on a Jetson)
    delegate: Literal["cpu", "edgetpu", "tensorrt", "cuda", "onnx-cpu"] = "cpu"
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

    _bundle_set = field_validator("bundle", mode="before")(not_empty)


class Inspection(_Section):
    deadline_ms: Annotated[float, Field(gt=0, le=60_000), whole_ms(250)] = 250.0
    failsafe: Literal["reject", "pass"] = "reject"
    queue_size: int = Field(4, ge=1, le=256)


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

    _dir_set = field_validator("dir", mode="before")(not_empty)


class Ui(_Section):
    """The operator page (agent/report/ui/): off the inspect path, local unless configured."""
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
        from agent.frame_checks import FrameCheckSettings

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
    gate: GateConfig = NoneGateConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: Metrics = Metrics()
    recorder: Recorder = Recorder()
    frame_checks: FrameChecks = FrameChecks()
    ui: Ui = Ui()
    log: Log = Log()
    trigger: TriggerConfig = FrameTrigger()


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


def _format(e: ValidationError, prefix: tuple, root: type[BaseModel],
            union: tuple[str, str, dict] | None = None) -> list[str]:
    """One line per error. ``union``: (tag key, tag, models) when root is one of a union's."""
    out = []
    for err in e.errors():
        loc = prefix + tuple(str(p) for p in err["loc"])
        where = ".".join(loc) or "config"
        kind = err["type"]
        owners = [t for t, m in (union[2] if union else {}).items() if loc[-1] in m.model_fields]
        if kind == "extra_forbidden" and owners:
            # a key of another kind: say so rather than suggest a near name
            out.append(f"{where}: unknown key for {union[0]} = {union[1]!r} (a key of "
                       f"{' and '.join(repr(t) for t in owners)})")
        elif kind == "extra_forbidden":
            known = list(root.model_fields)
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


# Sections that are unions: (the key that picks the model, its default, the models by
# that key, how an unknown one is named)
_UNIONS = {
    "gate": ("kind", "none", GATE_KINDS,
             lambda v, kinds: f"{v!r} is not one of "
                              f"{', '.join(repr(k) for k in list(kinds)[:-1])} or {list(kinds)[-1]!r}"),
    "trigger": ("mode", "frame", TRIGGER_MODES,
                lambda v, kinds: f"{v!r} is not one of {tuple(kinds)}"),
}


def parse_config(raw: dict, base: Path = Path(".")) -> Config:
    """Every problem in the file at once, one line each: unknown sections, each section's
    field errors, then every rule across keys and sections whose keys are valid."""
    _resolve_paths(raw, base)
    problems: list[str] = []
    known = list(Config.model_fields)
    for key in raw:
        if key not in Config.model_fields:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"
            problems.append(f"{key}: unknown key{hint}")
    sections: dict[str, Optional[BaseModel]] = {}
    partial = bool(problems)
    for name, field in Config.model_fields.items():
        section, found = _parse_section(name, raw.get(name, {}), field.annotation)
        sections[name] = section
        problems += found
        partial = partial or bool(found)
    problems += _rule_problems(sections, partial)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def _parse_section(name: str, raw, annotation) -> tuple[Optional[BaseModel], list[str]]:
    """(the section, its field errors). With field errors the section holds only its valid
    keys (the rules that read only those still run) or is None when that is not possible."""
    cls, union = annotation, None
    if name in _UNIONS:
        # a union: pick the model by its key first, so errors name that model's own keys
        # rather than pydantic's tagged location
        key, default, kinds, unknown = _UNIONS[name]
        if not isinstance(raw, dict):
            return None, [f"{name}: must be a table ([{name}])"]
        tag = raw.get(key, default)
        cls = kinds.get(tag) if isinstance(tag, str) else None
        if cls is None:
            return None, [f"{name}.{key}: {unknown(tag, kinds)}"]
        union = (key, tag, kinds)
    try:
        return cls.model_validate(raw, context=DEFER_CHECKS), []
    except ValidationError as e:
        found = _format(e, (name,), cls, union)
        bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        if not isinstance(raw, dict) or any(not err["loc"] for err in e.errors()):
            return None, found
    try:
        section = cls.model_validate({k: v for k, v in raw.items() if k not in bad},
                                     context=DEFER_CHECKS)
    except ValidationError:
        return None, found
    for k in bad:
        # gone, not defaulted: a rule reading it raises AttributeError and is skipped
        section.__dict__.pop(k, None)
    return section, found


def _rule_problems(sections: dict, partial: bool) -> list[str]:
    """The sections' own rules across their keys (firmware_io.checked), then the rules
    across sections (agent.config_rules), as one line each."""
    found: list[tuple[str, str]] = []
    for name, section in sections.items():
        if isinstance(section, Checked):
            found += [(f"{name}.{k}" if k else name, m)
                      for k, m in run_checks(section.checks(), partial)]
    c = SimpleNamespace(**sections)
    found += run_checks([lambda rule=rule: rule(c) for rule in RULES], partial)
    wheres = {w for w, _ in found}
    moot = {SUPERSEDES[w] for w in wheres if w in SUPERSEDES}
    return [f"{w}: {m}" for w, m in found if w not in moot]


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
        f"gate      {g.kind}" + ("" if g.kind == "none" else f" {getattr(g, 'port', None) or ''} "
                                 f"fires {timing}, "
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
