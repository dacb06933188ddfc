"""check-config: each realistic mistake gives one precise line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.commands.check_config import main as check_main
from agent.config import ConfigError, load_config


DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "agent" / "demo_data" / "bundle"


@pytest.fixture
def env(tmp_path):
    """A world where the files the good config names exist."""
    # a real bundle: check-config loads it as run does
    shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle")
    (tmp_path / "images").mkdir()
    (tmp_path / "mqtt.pass").write_text("secret\n")
    return tmp_path


GOOD = """
[station]
id = "line1-cam1"
[camera]
source = "images"
fps = 10
[model]
bundle = "bundle"
[inspection]
deadline_ms = 200
[gate]
kind = "none"
[mqtt]
host = "127.0.0.1"
outbox = "state/outbox.sqlite"
[metrics]
port = 0
[recorder]
dir = "state/images"
"""


def problems(write_config, text: str) -> list[str]:
    path = write_config(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def test_good_config_loads_and_resolves_relative_paths(env, write_config):
    cfg = load_config(write_config(GOOD))
    assert cfg.station.id == "line1-cam1"
    assert cfg.model.bundle == env / "bundle"
    assert cfg.camera.source == str(env / "images")
    assert cfg.inspection.failsafe == "reject"


@pytest.mark.parametrize("edit, expected", [
    # 1 misspelt key, with a suggestion
    (("fps = 10", "fsp = 10"), "camera.fsp: unknown key (did you mean 'fps'?)"),
    # 2 wrong type
    (("fps = 10", 'fps = "fast"'), "camera.fps: input should be a valid number"),
    # 3 out of range
    (("deadline_ms = 200", "deadline_ms = -5"), "inspection.deadline_ms: input should be greater than 0"),
    # 4 unknown choice
    (('kind = "none"', 'kind = "relay"'), "gate.kind: 'relay' is not one of 'serial', 'modbus', 'mqtt' or 'none'"),
    # 5 missing bundle folder
    (('bundle = "bundle"', 'bundle = "nope"'), "model.bundle: "),
    # 6 camera file missing
    (('source = "images"', 'source = "line.mp4"'), "camera.source: "),
    # 7 delay shorter than the deadline
    (('kind = "none"', 'kind = "serial"\nport = "/dev/null"\ndelay_ms = 150'),
     "gate.delay_ms: 150 ms is not longer than inspection.deadline_ms (200 ms)"),
    # 8 serial gate without a port
    (('kind = "none"', 'kind = "serial"\ndelay_ms = 800'), "gate.port: a serial gate needs the serial port"),
    # 9 serial port device missing
    (('kind = "none"', 'kind = "serial"\nport = "/dev/ttyUSB9"\ndelay_ms = 800'),
     "gate.port: /dev/ttyUSB9 does not exist"),
    # 10 both timing modes
    (('kind = "none"', 'kind = "serial"\nport = "/dev/null"\ndelay_ms = 800\nencoder_offset = 100'),
     "gate: set delay_ms (time mode) or encoder_offset (encoder mode), not both"),
    # 11 encoder mode on a gate that cannot count
    (('kind = "none"', 'kind = "modbus"\nport = "/dev/null"\nencoder_offset = 100'),
     "gate.encoder_offset: encoder mode needs a gate controller that counts the encoder"),
    # 12 threshold outside [0, 1]
    (('bundle = "bundle"', 'bundle = "bundle"\nthreshold = 1.5'), "model.threshold: input should be less than or equal to 1"),
    # 13 password file that is not there
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nusername = "edge"\npassword_file = "missing.pass"'),
     "mqtt.password_file: "),
    # 14 station id that would break MQTT topics
    (('id = "line1-cam1"', 'id = "line 1/cam#1"'), "station.id: use only letters"),
    # 15 unknown section
    (("[metrics]", "[metric]"), "metric: unknown key (did you mean 'metrics'?)"),
    # 16 TLS files without TLS
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\nca_file = "mqtt.pass"'), "mqtt.tls: ca_file/cert_file are set but tls = false"),
    # 17 unknown delegate
    (('bundle = "bundle"', 'bundle = "bundle"\ndelegate = "gpu"'), "model.delegate: 'gpu' is not one of 'cpu', 'edgetpu', 'tensorrt', 'cuda' or 'onnx-cpu'"),
    # 18 a number of views a bundle cannot have
    (('bundle = "bundle"', 'bundle = "bundle"\nviews = 3'), "model.views: 3 is not one of 1, 2 or 4"),
])
def test_each_mistake_names_field_and_problem(env, write_config, edit, expected):
    old, new = edit
    assert old in GOOD
    found = problems(write_config, GOOD.replace(old, new, 1))
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_toml_syntax_error(env, write_config):
    found = problems(write_config, GOOD + "\n[gate\n")
    assert "not valid TOML" in found[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "absent.toml")
    assert e.value.problems == [f"{tmp_path / 'absent.toml'}: config file not found"]


def test_check_config_exit_codes_and_output(env, write_config, capsys):
    good = write_config(GOOD)
    assert check_main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "station   line1-cam1" in out and out.rstrip().endswith("OK")
    bad = write_config(GOOD.replace("fps = 10", "fps = 10\ncolour = 1"), "bad.toml")
    assert check_main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error: camera.colour: unknown key" in err


def test_cli_entry_point_runs_check_config(env, write_config):
    bad = write_config(GOOD.replace("deadline_ms = 200", "deadline_ms = 0"))
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "inspection.deadline_ms" in r.stderr


def test_example_config_is_valid_apart_from_hardware(tmp_path):
    """The shipped example must only fail on what an edge box provides (devices, bundle)."""
    from pathlib import Path
    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    cfg = load_config(example, check_env=False)
    assert cfg.gate.kind == "serial" and cfg.gate.delay_ms > cfg.inspection.deadline_ms


def test_every_problem_at_once_and_no_rule_on_a_bad_key():
    """Field errors, each section's rules and the rules across sections in one report; a
    rule that needs a key that failed (the late-gate rule needs deadline_ms) is not run."""
    from agent.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"inspection": {"deadline_ms": "x"},
                      "gate": {"kind": "serial", "delay_ms": 150, "heartbeat_ms": 2},
                      "ui": {"port": 8080, "bind": "0.0.0.0"},
                      "trigger": {"mode": "presence", "line": 0.02, "scale": 0}})
    assert [p.split(":")[0] for p in e.value.problems] == [
        "inspection.deadline_ms", "gate.heartbeat_ms", "trigger.scale",     # fields
        "gate.port", "gate.retries", "trigger",                             # within sections
        "ui.token_file",                                                    # across sections
    ], e.value.problems
    assert not any("inspection.deadline_ms (" in p for p in e.value.problems)


def test_the_link_tuning_is_not_a_config_key():
    """The agent always runs the outbox with synchronous=FULL (docs/mqtt.md)."""
    from agent.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({"mqtt": {"outbox_sync": "NORMAL"}})
    assert e.value.problems[0].startswith("mqtt.outbox_sync: unknown key")
