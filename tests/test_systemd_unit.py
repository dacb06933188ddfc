"""systemd/edge-inspect.service: what it must say, and `systemd-analyze verify` on it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-inspect.service"
BIN = "/opt/edge-inspect/venv/bin/edge-inspect"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value, in order (unit files repeat keys)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out[section][key.strip()].append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit():
    return parse(UNIT.read_text())


def one(unit, key, section="Service"):
    values = unit[section][key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_notify_and_lifecycle(unit):
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    # --no-devices: an unplugged camera/gate adapter starts degraded instead of exit 2
    assert one(unit, "ExecStart") == f"{BIN} run --no-devices --config /etc/edge-inspect/config.toml"
    pre = one(unit, "ExecStartPre")
    assert pre.startswith(f"{BIN} check-config") and pre.endswith("/etc/edge-inspect/config.toml")
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one(unit, "WatchdogSec"))
    assert int(one(unit, "TimeoutStopSec").rstrip("s")) >= 10
    assert one(unit, "RestartSec")
    assert one(unit, "StartLimitIntervalSec", "Unit") and one(unit, "StartLimitBurst", "Unit")
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_identity_and_filesystem(unit):
    assert one(unit, "User") == "edge-inspect"
    assert one(unit, "SupplementaryGroups").split() == ["dialout", "video", "plugdev"]
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ReadWritePaths") == "/var/lib/edge-inspect"
    assert one(unit, "StateDirectory") == "edge-inspect"
    assert one(unit, "UMask") == "0027"


def test_devices_visible_but_fenced(unit):
    # PrivateDevices would hide the camera, the serial port and the Coral
    assert "PrivateDevices" not in unit["Service"]
    assert one(unit, "DevicePolicy") == "closed"
    allowed = {v.split()[0]: v.split()[1] for v in unit["Service"]["DeviceAllow"]}
    for dev in ("char-video4linux", "char-ttyUSB", "char-ttyACM", "/dev/edge-gate",
                "char-usb_device", "char-apex"):
        assert allowed.get(dev) == "rw", dev


def test_privileges_and_kernel(unit):
    s = unit["Service"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert one(unit, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "LockPersonality", "RestrictRealtime"):
        assert one(unit, key) == "yes", key
    assert one(unit, "SystemCallArchitectures") == "native"
    # not set on purpose (the unit says why): see test name
    assert "PrivateUsers" not in s and "ProcSubset" not in s


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with its binaries pointed at ones that exist here: verify checks that every
    Exec*= command is executable, and /opt/edge-inspect is not installed on a build box."""
    true = shutil.which("true") or "/bin/true"
    text = UNIT.read_text().replace(BIN, true)
    if not Path("/bin/kill").exists():  # procps missing in a slim container
        text = text.replace("/bin/kill", true)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    r = _verify(_verifiable_copy(tmp_path))
    # verify exits 0 on many problems (unknown keys, bad values): they only show as
    # messages, so a clean unit is one that makes it print nothing at all.
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


@needs_analyze
def test_verify_would_catch_mistakes(tmp_path):
    """The check above is meaningful: verify reports a misspelled key and a bad value."""
    copy = _verifiable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("Type=notify", "Type=notfy")
                    .replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomee=yes"))
    out = (lambda r: r.stdout + r.stderr)(_verify(copy))
    assert "notfy" in out and "ProtectHomee" in out


@needs_analyze
def test_unverified_copy_flags_the_missing_binary(tmp_path):
    """And the repo's unit as-is names the installed path (absent on a build box)."""
    if Path(BIN).exists():
        pytest.skip(f"{BIN} is installed here")
    copy = tmp_path / UNIT.name
    shutil.copy(UNIT, copy)
    r = _verify(copy)
    assert BIN in r.stdout + r.stderr


@needs_analyze
def test_security_exposure_is_low(tmp_path):
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager",
                        str(_verifiable_copy(tmp_path))],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security scoring: {r.stderr.strip()[:200]}")
    assert float(m.group(1)) <= 2.5, r.stdout
