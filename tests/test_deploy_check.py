"""deploy-model --check (verify only, one line, switch nothing) and run --pid-file (the
file deploy-model --pid-file signals), on the demo bundle and a real daemon process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.commands.deploy_model import main as deploy_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"


def _bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(DEMO / "bundle", b)
    return b


def _run_check(capsys, *args) -> tuple[int, list[str]]:
    code = deploy_main(["deploy-model", "--check", *map(str, args)])
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    return code, out


def test_check_verifies_and_switches_nothing(tmp_path, capsys):
    b = _bundle(tmp_path)
    models = tmp_path / "models"
    code, out = _run_check(capsys, b, "--models-dir", models)
    assert code == 0 and len(out) == 1, out
    assert out[0].startswith("deploy-model: ok: ") and "smoke test" in out[0]
    assert "nothing switched" in out[0]
    assert not models.exists()                              # not even created


def test_check_refuses_a_tampered_model(tmp_path, capsys):
    b = _bundle(tmp_path)
    data = bytearray((b / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.tflite").write_bytes(bytes(data))
    code, out = _run_check(capsys, b)
    assert code == 2 and len(out) == 1 and out[0].startswith("deploy-model: refused: "), out
    assert "model.tflite" in out[0]


def test_check_refuses_a_file_name_outside_the_bundle(tmp_path, capsys):
    b = _bundle(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"x")
    meta = json.loads((b / "bundle.json").read_text())
    meta["files"]["../outside.bin"] = {"sha256": "0" * 64, "bytes": 1}
    (b / "bundle.json").write_text(json.dumps(meta))
    code, out = _run_check(capsys, b)
    assert code == 2 and len(out) == 1 and "refused" in out[0], out


def test_check_needs_a_bundle(tmp_path, capsys):
    try:
        deploy_main(["deploy-model", "--check", "--rollback"])
    except SystemExit as e:
        assert e.code == 2
    else:  # pragma: no cover
        raise AssertionError("--check --rollback was accepted")


def test_run_pid_file_written_signalled_and_removed(tmp_path):
    pid_file = tmp_path / "run" / "edge-inspect.pid"
    pid_file.parent.mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'''
[camera]
source = "{DEMO / 'images'}"
loop = true
fps = 5
[model]
bundle = "{DEMO / 'bundle'}"
threads = 1
[gate]
kind = "none"
[mqtt]
enabled = false
[metrics]
port = 0
[recorder]
enabled = false
[frame_checks]
frozen_frames = 0
''')
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg),
                             "--pid-file", str(pid_file)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t_end = time.monotonic() + 30
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.05)
        assert pid_file.exists(), proc.communicate(timeout=10)[0] if proc.poll() is not None else ""
        assert pid_file.read_text().split() == [str(proc.pid)]
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        # deploy-model --pid-file signals that pid (SIGHUP: the agent reloads) at once, while
        # the agent may still be loading its model: the reload must happen, not a dead daemon
        code = deploy_main(["deploy-model", str(_bundle(tmp_path)), "--models-dir",
                            str(tmp_path / "models"), "--pid-file", str(pid_file)])
        assert code == 0
        t_end = time.monotonic() + 60
        while not any("reload (SIGHUP)" in ln for ln in lines) and proc.poll() is None \
                and time.monotonic() < t_end:
            time.sleep(0.1)
        assert proc.poll() is None, "".join(lines)          # SIGHUP reloads, does not stop
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)
        out = "".join(lines)
        assert proc.returncode == 0, out
        assert "reload (sighup): now running" in out.lower(), out
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
