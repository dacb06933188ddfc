"""Every console command, run as a user runs it: the installed `edge-inspect` script in a
subprocess. A command whose entry point is wired wrong (issue 21: gate-sim passed its own
name on as an argument) fails here, not on a plant engineer's box."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.commands.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"
BUNDLE = DEMO / "bundle"


def _script() -> str:
    here = Path(sys.executable).parent / "edge-inspect"
    found = str(here) if here.exists() else shutil.which("edge-inspect")
    if not found:
        pytest.fail("the edge-inspect console script is not installed (pip install -e .)")
    return found


def cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_under_its_own_name(command):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: edge-inspect {command}"), r.stdout[:200]


def test_top_level_help_lists_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for command in COMMANDS:
        assert command in r.stdout


@pytest.fixture
def station(tmp_path) -> Path:
    """A config that runs without hardware: the demo bundle on four demo images."""
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(DEMO / "images"))[:2] + sorted(os.listdir(DEMO / "images"))[-2:]:
        shutil.copy(DEMO / "images" / name, images / name)
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [camera]
        source = "images"
        [model]
        bundle = "{BUNDLE}"
        threads = 1
        [inspection]
        deadline_ms = 5000
        [mqtt]
        enabled = false
        [metrics]
        port = 0
        [recorder]
        dir = "recorded"
    """))
    return cfg


def test_check_config_then_run(station):
    r = cli("check-config", str(station))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f"{station}: OK")
    r = cli("run", "--config", str(station))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped: 4 parts" in r.stdout + r.stderr   # the log goes to stdout (journald)


def test_demo(tmp_path):
    r = cli("demo", "--quiet", "--threads", "1", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parts" in r.stdout and "reject" in r.stdout


def test_gate_sim_serves_a_pty_and_exits_cleanly():
    r = cli("gate-sim", "--pty", "--duration", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("/dev/")
    assert "gate-sim: rej=0 fired=0" in r.stderr


def test_gate_sim_bad_argument_says_which():
    r = cli("gate-sim", "--pty", "--gates", "x")
    assert r.returncode == 2
    assert "bad --gates 'x'" in r.stderr


def test_bench(tmp_path):
    r = cli("bench", str(BUNDLE), "--source", str(DEMO / "images"), "--threads", "1",
            "--workers", "1", "--seconds", "0.3", "--json", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report


def test_deploy_model_into_a_models_dir(tmp_path):
    models = tmp_path / "models"
    r = cli("deploy-model", str(BUNDLE), "--models-dir", str(models), "--no-reload")
    assert r.returncode == 0, r.stderr
    assert (models / "current" / "bundle.json").is_file()


def test_evaluate_on_class_folders(tmp_path):
    data = tmp_path / "data"
    for name in sorted(os.listdir(DEMO / "images")):
        cls = "good" if name.startswith("good_") else "defect"
        (data / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / "images" / name, data / cls / name)
    r = cli("evaluate", str(BUNDLE), str(data), "--json", "--threads", "1", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report


def test_train_refuses_a_missing_folder_in_one_line(tmp_path):
    r = cli("train", str(tmp_path / "absent"), "--out", str(tmp_path / "b"), timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_show_prints_operating_points_views_and_provenance(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(BUNDLE, b)
    m = json.loads((b / "bundle.json").read_text())
    sel = m["metrics"]["threshold_selection"]
    sel["operating_points"] = [
        {"max_escape": 0.005, "threshold": 0.41, "escape_rate": 0.005, "false_reject_rate": 0.2},
        {"max_escape": 0.02, "threshold": 0.66, "escape_rate": 0.02, "false_reject_rate": 0.05}]
    sel["by_views"] = {"1": {"threshold": 0.57, "validation": {"escape_rate": 0.01, "false_reject_rate": 0.04},
                             "test": {"accuracy": 0.93, "escape_rate": 0.008, "false_reject_rate": 0.12}}}
    (b / "bundle.json").write_text(json.dumps(m))
    r = cli("show", str(b))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.split() == ["0.5%", "0.4100", "0.5%", "20.0%"] for ln in lines), r.stdout
    assert any(ln.split() == ["1", "0.5700", "1.0%", "4.0%", "93.0%", "0.8%", "12.0%"]
               for ln in lines), r.stdout
    assert "dataset_fingerprint  f0ec7cf9" in r.stdout and "hashes verified" in r.stdout
    # a bundle trained without a test/ folder records "test": null in its counts
    m["provenance"]["counts"]["test"] = None
    (b / "bundle.json").write_text(json.dumps(m))
    r = cli("show", str(b))
    assert r.returncode == 0 and "validation images" in r.stdout, r.stderr
    assert "test images" not in r.stdout
    # a changed model is still shown, but loudly and with a failing exit code
    model = b / "model.tflite"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    r = cli("show", str(b))
    assert r.returncode == 1 and "corrupt or was changed" in r.stderr
    assert "HASHES DO NOT MATCH" in r.stdout
    r = cli("show", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.startswith("error: model bundle")


def test_gate_sim_naks_seq_zero_even_for_a_heartbeat(pty_pair):
    """seq 0 is never used: the simulator must not ACK `HB 0` (it hid a host bug)."""
    import select
    from firmware_io import protocol as P
    from firmware_io.gate_sim import GateSimulator

    sim = GateSimulator(fd=pty_pair.peer_fd).start()
    try:
        replies = b""
        for line in (P.encode("HB", 0), P.encode("HB", 7)):
            os.write(pty_pair.host_fd, line)
        deadline = time.monotonic() + 3
        while replies.count(b"\n") < 2 and time.monotonic() < deadline:
            if select.select([pty_pair.host_fd], [], [], 0.1)[0]:
                replies += os.read(pty_pair.host_fd, 256)
        got = [P.decode_line(ln) for ln in replies.splitlines(keepends=True)]
        assert [type(m).__name__ for m in got] == ["Nak", "Ack"], replies
        assert got[0].seq == 0 and got[0].code == "BADARG" and got[1].seq == 7
        assert sim.counters.hb == 1
    finally:
        sim.stop()
