"""check-config OK means `run` starts (issue 21, items 2-5): the mistakes a new user made,
each refused in one line naming the field, several at once, and never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "agent" / "demo_data" / "bundle"


@pytest.fixture
def site(tmp_path):
    """A real bundle, an image folder and a place for state, as an edge box has them."""
    shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DEMO_BUNDLE / "sample.png", images / "good_1.png")
    return tmp_path


BASE = """
[camera]
source = "images"
[model]
bundle = "bundle"
[inspection]
deadline_ms = 200
[mqtt]
outbox = "state/outbox.sqlite"
[metrics]
port = 0
[recorder]
dir = "state/images"
"""


def check(site: Path, text: str, *extra: str) -> tuple[int, list[str], str]:
    """check-config on BASE plus `text`: (exit code, error lines, stdout)."""
    path = site / "config.toml"
    path.write_text(_merge(BASE, textwrap.dedent(text)))
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", str(path), *extra],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln[len("error: "):] for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    return r.returncode, errors, r.stdout + r.stderr


def _merge(base: str, extra: str) -> str:
    """Put extra's keys into base's sections (TOML forbids a section twice)."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    for text in (base, extra):
        current = ""
        for line in text.splitlines():
            if line.startswith("["):
                current = line.strip()
                if current not in sections:
                    sections[current] = []
                    order.append(current)
            elif line.strip():
                key = line.split("=")[0].strip()
                body = sections.setdefault(current, [])
                if current not in order:
                    order.append(current)
                body[:] = [b for b in body if b.split("=")[0].strip() != key] + [line]
    return "\n".join(f"{s}\n" + "\n".join(sections[s]) for s in order) + "\n"


def test_the_readme_sample_two_problems_at_once(site):
    code, errors, _ = check(site, """
        [camera]
        fsp = 10
        [gate]
        kind = "serial"
        port = "/dev/ttyUSB0"
        delay_ms = 150
    """)
    assert code == 2
    assert errors == [
        "camera.fsp: unknown key (did you mean 'fps'?)",
        "gate.delay_ms: 150 ms is not longer than inspection.deadline_ms (200 ms): the part "
        "would reach the gate before its verdict",
    ]


def test_a_bad_field_and_a_cross_field_mistake_are_reported_together(site):
    """Field errors do not hide the rules across keys and sections, and a rule that would
    read a bad key is not run on a guess (no bogus 'needs delay_ms' for a bad delay_ms)."""
    port = '[gate]\nkind = "serial"\nport = "/dev/ttyUSB0"\n'
    # one section: a bad pulse and a heartbeat the firmware would take for a dead host
    code, errors, _ = check(site, port + "delay_ms = 800\npulse_ms = 0\nheartbeat_ms = 2500")
    assert code == 2
    assert [e.split(":")[0] for e in errors] == ["gate.pulse_ms", "gate.heartbeat_ms"], errors
    assert errors[0].startswith("gate.pulse_ms: input should be greater than or equal to 1")
    assert errors[1].startswith("gate.heartbeat_ms: 2500 ms is not shorter than")
    # across sections: a bad baud beside a delay inside the deadline, and a typo elsewhere
    code, errors, _ = check(site, port + 'delay_ms = 150\nbaud = "fast"\n[camera]\nfsp = 10')
    assert code == 2
    assert errors == [
        "camera.fsp: unknown key (did you mean 'fps'?)",
        "gate.baud: input should be a valid integer, unable to parse string as an integer "
        "(got 'fast')",
        "gate.delay_ms: 150 ms is not longer than inspection.deadline_ms (200 ms): the part "
        "would reach the gate before its verdict",
    ]
    # a rule that reads the bad key is skipped
    code, errors, _ = check(site, port + 'delay_ms = "soon"')
    assert code == 2 and len(errors) == 1 and errors[0].startswith("gate.delay_ms: input should "
                                                                   "be a valid number"), errors


@pytest.mark.parametrize("text, expected", [
    ("[inspection]\ndeadline_ms = 0.25", "inspection.deadline_ms: 0.25 ms is under 1 ms; the value is in milliseconds"),
    ('[gate]\nkind = "mqtt"\ndelay_ms = 0.8', "gate.delay_ms: 0.8 ms is under 1 ms"),
    ('[camera]\nsource = ""', "camera.source: is empty"),
    ('[camera]\nsource = "rtps://10.0.0.5/stream"', "camera.source: unknown stream scheme 'rtps://' (did you mean 'rtsp://'?)"),
    ('[mqtt]\nprefix = "plant a"', "mqtt.prefix: must be a plain topic prefix"),
    ('[mqtt]\nprefix = "a//b"', "mqtt.prefix: must be a plain topic prefix"),
    ('[mqtt]\nhost = "tcp://127.0.0.1:1883"', "mqtt.host: 'tcp://127.0.0.1:1883' is not a host name"),
    ('[mqtt]\nhost = "127.0.0.1:1883"', "mqtt.host: '127.0.0.1:1883' is not a host name"),
    ('[recorder]\ndir = ""', "recorder.dir: is empty"),
])
def test_schema_mistakes(site, text, expected):
    code, errors, _ = check(site, text)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_serial_gate_timing_mistakes(site, pty_pair):
    gate = f'[gate]\nkind = "serial"\nport = "{pty_pair.host_path}"\ndelay_ms = 800\n'
    code, errors, _ = check(site, gate)
    assert code == 0, errors
    code, errors, _ = check(site, gate + "ack_timeout_ms = 300\nretries = 3")
    assert errors == ["gate.retries: the last resend of an unanswered reject would leave 900 ms "
                      "(ack_timeout_ms 300 x retries 3) after the first, when the part is past "
                      "the gate (delay_ms 800); lower retries or ack_timeout_ms"]
    code, errors, _ = check(site, gate + "heartbeat_ms = 2500")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("gate.heartbeat_ms: 2500 ms is not shorter than the gate "
                                "firmware's heartbeat timeout (2000 ms)")


def test_serial_port_must_be_a_serial_device(site, pty_pair):
    regular = site / "ttyUSB0"
    regular.write_text("")
    for port, expected in ((regular, f"gate.port: {regular} is a regular file, not a serial device"),
                           ("/dev/null", "gate.port: /dev/null is not a serial port")):
        for extra in ((), ("--no-devices",)):   # a file is wrong whether devices are needed or not
            code, errors, _ = check(site, f'[gate]\nkind = "serial"\nport = "{port}"\ndelay_ms = 800',
                                    *extra)
            assert code == 2 and len(errors) == 1 and errors[0].startswith(expected), errors


def test_files_that_are_folders_and_folders_that_are_files(site):
    (site / "state").mkdir()
    (site / "state" / "images").write_text("not a folder")
    (site / "outbox.d").mkdir()
    (site / "pw.d").mkdir()
    code, errors, _ = check(site, """
        [mqtt]
        outbox = "outbox.d"
        username = "edge"
        password_file = "pw.d"
    """)
    assert code == 2
    assert sorted(e.split(":")[0] for e in errors) == ["mqtt.outbox", "mqtt.password_file",
                                                       "recorder.dir"], errors
    assert any(e.startswith(f"mqtt.password_file: {site / 'pw.d'} is a directory") for e in errors)
    assert any(e.startswith(f"mqtt.outbox: {site / 'outbox.d'} is a directory") for e in errors)
    assert any(e.startswith(f"recorder.dir: {site / 'state' / 'images'} is a file") for e in errors)


def test_an_outbox_that_is_not_sqlite(site):
    (site / "state").mkdir()
    (site / "state" / "outbox.sqlite").write_text("hello")
    code, errors, _ = check(site, "")
    assert code == 2 and errors[0].startswith("mqtt.outbox: ") and "not an SQLite" in errors[0]


def test_tls_ca_file_that_is_not_a_certificate(site):
    (site / "ca.pem").write_text("this is not a certificate\n")
    code, errors, _ = check(site, '[mqtt]\ntls = true\nca_file = "ca.pem"')
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"mqtt.ca_file: {site / 'ca.pem'} is not a PEM CA certificate")


def test_world_readable_password_file_is_warned_about(site):
    pw = site / "mqtt.pass"
    pw.write_text("secret\n")
    os.chmod(pw, 0o644)
    code, _, out = check(site, '[mqtt]\nusername = "edge"\npassword_file = "mqtt.pass"')
    assert code == 0
    assert f"warning: mqtt.password_file: {pw} is readable by every user" in out
    os.chmod(pw, 0o600)
    code, _, out = check(site, '[mqtt]\nusername = "edge"\npassword_file = "mqtt.pass"')
    assert code == 0 and "warning" not in out


# -- the bundle, loaded as run loads it ----------------------------------------------------

def _run(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "run", "--config",
                           str(site / "config.toml")], capture_output=True, text=True, timeout=60)


def test_a_tampered_bundle_fails_check_config_as_it_fails_run(site):
    model = site / "bundle" / "model.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    code, errors, _ = check(site, "[mqtt]\nenabled = false")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("model.bundle: ") and "corrupt or was changed" in errors[0]
    assert _run(site).returncode == 2


def test_views_the_bundle_has_no_operating_point_for(site):
    code, errors, _ = check(site, "[model]\nviews = 2\n[mqtt]\nenabled = false")
    assert code == 2 and len(errors) == 1
    assert "no operating point for 2 view(s)" in errors[0]
    assert _run(site).returncode == 2


def test_ok_names_the_model_it_loaded(site):
    code, errors, out = check(site, "")
    assert code == 0, errors
    assert "bundle    " in out and "320x320 gray, 1 view(s)" in out


@pytest.mark.parametrize("text, field", [
    ('[mqtt]\ntls = true\nca_file = "ca.pem"', "mqtt.ca_file"),
    ('[mqtt]\noutbox = "outbox.d"', "mqtt.outbox"),
])
def test_run_refuses_in_one_line_not_a_traceback(site, text, field):
    (site / "ca.pem").write_text("this is not a certificate\n")
    (site / "outbox.d").mkdir()
    (site / "config.toml").write_text(_merge(BASE, textwrap.dedent(text)))
    r = _run(site)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {field}: "), r.stderr


def test_the_agent_itself_refuses_a_bad_ca_file_in_one_line(site):
    """Behind check-config, Agent.start (the demo, tests, embedders) says it too."""
    from agent.config import parse_config
    from agent.commands.daemon import Agent, StartupError

    (site / "ca.pem").write_text("this is not a certificate\n")
    cfg = parse_config({"camera": {"source": "images"}, "model": {"bundle": "bundle"},
                        "metrics": {"port": 0}, "recorder": {"enabled": False},
                        "mqtt": {"tls": True, "ca_file": "ca.pem", "outbox": "ob.sqlite"}}, site)
    with pytest.raises(StartupError) as e:
        Agent(cfg).start()
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("mqtt.tls: ")
