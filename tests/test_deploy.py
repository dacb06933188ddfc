"""edge-inspect deploy-model against real int8 TFLite bundles made here with TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.commands import deploy_model as deploy
from agent.bundle import load_bundle, write_manifest
from agent.preprocess import InputSpec

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable

# Two tiny full-int8 (uint8 in/out) classifiers with different weights, each with a sample
# image: the bundles convert/ would write, made in a subprocess so this test process (like
# the agent) never imports TensorFlow.
_BUILD = r'''
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from pathlib import Path
import numpy as np, cv2
try:
    import tensorflow as tf
except ImportError:
    sys.exit(77)
sys.path.insert(0, sys.argv[1])
from agent.bundle import write_manifest
from agent.preprocess import InputSpec
H = W = 16
for seed, name in ((1, "a"), (2, "b")):
    out = Path(sys.argv[2]) / name
    out.mkdir(parents=True)
    tf.keras.utils.set_random_seed(seed)
    m = tf.keras.Sequential([
        tf.keras.Input((H, W, 1), batch_size=1),
        tf.keras.layers.Rescaling(1 / 255.0),
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(2),
        tf.keras.layers.Softmax(),
    ])
    rng = np.random.default_rng(seed)
    def rep():
        for _ in range(16):
            yield [rng.integers(0, 256, (1, H, W, 1)).astype(np.float32)]
    c = tf.lite.TFLiteConverter.from_keras_model(m)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = tf.uint8
    c.inference_output_type = tf.uint8
    (out / "model.tflite").write_bytes(c.convert())
    cv2.imwrite(str(out / "sample.png"), rng.integers(0, 256, (48, 40), dtype=np.uint8))
    write_manifest(out, labels=["good", "scratch"], good_label="good",
                   input_spec=InputSpec(width=W, height=H, channels=1, color="gray"),
                   threshold=0.5, metrics={}, provenance={"made_by": "tests/test_deploy.py"},
                   sample="sample.png", name=f"tiny {name}")
'''


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    r = subprocess.run([PY, "-c", _BUILD, str(ROOT), str(out)], capture_output=True, text=True,
                       timeout=240)
    if r.returncode == 77:
        pytest.skip("building a test bundle needs TensorFlow (pip install -e '.[test]')")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"a": out / "a", "b": out / "b"}


@pytest.fixture
def models(tmp_path) -> Path:
    return tmp_path / "models"


def run(*args) -> int:
    return deploy.main(["edge-inspect deploy-model", *map(str, args)])


def target(models: Path, link: str) -> str | None:
    p = models / link
    return os.readlink(p) if p.is_symlink() else None


def entries(models: Path) -> set[str]:
    return {p.name for p in models.iterdir() if p.name != ".deploy.lock"}


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_deploy_switches_current(bundles, models, capsys):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    a = load_bundle(bundles["a"])
    name = f"tiny-a-{a.manifest_sha256[:12]}"
    assert target(models, "current") == name            # relative: the dir can move
    assert target(models, "previous") is None
    live = load_bundle(models / "current")                # what the agent will load
    assert live.model_sha256 == a.model_sha256 and live.files == a.files
    out = capsys.readouterr().out
    assert "smoke test on sample sample.png" in out and "current -> " + name in out

    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 0
    b = load_bundle(bundles["b"])
    assert target(models, "current") == f"tiny-b-{b.manifest_sha256[:12]}"
    assert target(models, "previous") == name
    assert entries(models) == {name, f"tiny-b-{b.manifest_sha256[:12]}", "current", "previous"}


def test_redeploy_is_idempotent(bundles, models, capsys):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 0
    before = (entries(models), target(models, "current"), target(models, "previous"))
    capsys.readouterr()
    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 0
    assert (entries(models), target(models, "current"), target(models, "previous")) == before
    assert "already current" in capsys.readouterr().out


def test_tampered_bundle_is_refused_and_current_unchanged(bundles, models, tmp_path, capsys):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    before = (entries(models), target(models, "current"), target(models, "previous"))

    bad = copy_bundle(bundles["b"], tmp_path / "tampered")
    data = bytearray((bad / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.tflite").write_bytes(bytes(data))
    capsys.readouterr()
    assert run(bad, "--models-dir", models, "--no-reload") == 2
    out = capsys.readouterr().out
    assert "refused" in out and "model.tflite is corrupt or was changed" in out
    assert "current is unchanged" in out
    assert (entries(models), target(models, "current"), target(models, "previous")) == before


@pytest.mark.parametrize("damage, reason", [
    ("missing_file", "listed in bundle.json but missing"),
    ("wrong_input", "does not match the bundle's input spec"),
    ("wrong_labels", "but the bundle lists 3 labels"),
    ("sample_not_image", "cannot be read as an image"),
    ("no_manifest", "bundle.json is missing"),
])
def test_invalid_bundles_are_refused(bundles, models, tmp_path, capsys, damage, reason):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    before = (entries(models), target(models, "current"))
    bad = copy_bundle(bundles["b"], tmp_path / "bad")
    spec = InputSpec(width=16, height=16, channels=1, color="gray")
    kw = dict(labels=["good", "scratch"], good_label="good", input_spec=spec, threshold=0.5,
              metrics={}, provenance={}, sample="sample.png", name="bad")
    if damage == "missing_file":
        (bad / "sample.png").unlink()
    elif damage == "wrong_input":
        write_manifest(bad, **{**kw, "input_spec": InputSpec(width=32, height=32, channels=1)})
    elif damage == "wrong_labels":
        write_manifest(bad, **{**kw, "labels": ["good", "scratch", "dent"]})
    elif damage == "sample_not_image":
        (bad / "sample.png").write_text("not a png")
        write_manifest(bad, **kw)
    elif damage == "no_manifest":
        (bad / "bundle.json").unlink()
    capsys.readouterr()
    assert run(bad, "--models-dir", models, "--no-reload") == 2
    out = capsys.readouterr().out
    assert reason in out, out
    assert (entries(models), target(models, "current")) == before


def test_rollback(bundles, models, capsys):
    assert run("--rollback", "--models-dir", models, "--no-reload") == 2   # nothing yet
    assert "no previous bundle" in capsys.readouterr().out
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 0
    a, b = target(models, "previous"), target(models, "current")
    assert run("--rollback", "--models-dir", models, "--no-reload") == 0
    assert (target(models, "current"), target(models, "previous")) == (a, b)
    assert load_bundle(models / "current").name == "tiny a"
    assert run("--rollback", "--models-dir", models, "--no-reload") == 0  # and back again
    assert (target(models, "current"), target(models, "previous")) == (b, a)


def test_rollback_refuses_a_damaged_previous(bundles, models, capsys):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 0
    prev = models / target(models, "previous")
    (prev / "model.tflite").write_bytes(b"garbage")
    cur = target(models, "current")
    assert run("--rollback", "--models-dir", models, "--no-reload") == 2
    assert "no longer verifies" in capsys.readouterr().out
    assert target(models, "current") == cur


def test_damaged_deployed_copy_is_replaced(bundles, models):
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    live = models / target(models, "current")
    (live / "model.tflite").write_bytes(b"bit rot")
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    load_bundle(models / "current")  # verifies again


def test_current_that_is_not_a_link_is_left_alone(bundles, models, capsys):
    shutil.copytree(bundles["a"], models / "current")
    assert run(bundles["b"], "--models-dir", models, "--no-reload") == 2
    assert "not a symlink" in capsys.readouterr().out
    assert (models / "current").is_dir() and not (models / "current").is_symlink()


def test_reload_by_sighup_to_a_pid(bundles, models, tmp_path):
    got = tmp_path / "got-hup"
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, sys, time, pathlib
        signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path({str(got)!r}).write_text("hup"), sys.exit(0)))
        print("ready", flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline().strip() == "ready"
        pid_file = tmp_path / "agent.pid"
        pid_file.write_text(f"{agent.pid}\n")
        assert run(bundles["a"], "--models-dir", models, "--pid-file", pid_file) == 0
        assert agent.wait(timeout=10) == 0 and got.read_text() == "hup"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    pid_file.write_text("999999999\n")
    # the switch happened; only telling the agent failed -> exit 1
    assert run(bundles["b"], "--models-dir", models, "--pid-file", pid_file) == 1
    assert load_bundle(models / "current").name == "tiny b"


def _fake_systemctl(bindir: Path, log: Path, active: bool, reload_ok: bool = True) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / "systemctl").write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in
  is-active) exit {0 if active else 3} ;;
  reload) {'exit 0' if reload_ok else 'echo "Job for edge-inspect.service failed." >&2; exit 1'} ;;
esac
""")
    (bindir / "systemctl").chmod(0o755)


def test_reload_through_systemctl(bundles, models, tmp_path, monkeypatch, capsys):
    log, bindir = tmp_path / "systemctl.log", tmp_path / "bin"
    _fake_systemctl(bindir, log, active=True)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert run(bundles["a"], "--models-dir", models, "--service", "edge-inspect") == 0
    assert log.read_text().splitlines() == ["is-active --quiet edge-inspect", "reload edge-inspect"]

    _fake_systemctl(bindir, log, active=False)
    assert run(bundles["b"], "--models-dir", models) == 0
    assert "is not running" in capsys.readouterr().out
    assert log.read_text().splitlines()[-1] == "is-active --quiet edge-inspect"

    _fake_systemctl(bindir, log, active=True, reload_ok=False)
    assert run("--rollback", "--models-dir", models) == 1
    assert "systemctl reload edge-inspect failed" in capsys.readouterr().out


def test_no_systemctl_says_so(bundles, models, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert run(bundles["a"], "--models-dir", models) == 0
    assert "systemctl not found" in capsys.readouterr().out
    assert target(models, "current")


def test_usage_errors(bundles, models):
    with pytest.raises(SystemExit) as e:
        run("--models-dir", models)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run(bundles["a"], "--rollback", "--models-dir", models)
    assert e.value.code == 2


def test_cli_runs_it_without_tensorflow(bundles, models):
    """Through the real CLI entry, in a fresh interpreter, as on the edge box."""
    code = ("import sys; from agent.commands.cli import main; rc = main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'deploy-model imported tensorflow'; "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "deploy-model", str(bundles["b"]),
                        "--models-dir", str(models), "--no-reload"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((models / "current" / "bundle.json").read_text())["name"] == "tiny b"


def test_running_daemon_follows_deploy_and_rollback(bundles, models, tmp_path):
    """The whole rollout on a live agent: deploy A, start `edge-inspect run` under a fake
    systemd notify socket, deploy B with --pid-file (SIGHUP), refuse a tampered C without
    disturbing the agent, roll back to A; READY/RELOADING/STOPPING arrive as they should."""
    import socket

    import cv2
    import numpy as np

    sha = {k: load_bundle(v).model_sha256[:12] for k, v in bundles.items()}
    assert run(bundles["a"], "--models-dir", models, "--no-reload") == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        cv2.imwrite(str(imgs / f"{i}.png"), rng.integers(0, 256, (48, 40), dtype=np.uint8))
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [station]
        id = "deploy-test"
        [camera]
        source = "{imgs}"
        loop = true
        fps = 20
        [model]
        bundle = "{models / 'current'}"
        threads = 1
        [gate]
        kind = "none"
        [mqtt]
        enabled = false
        [metrics]
        port = 0
        [recorder]
        enabled = false
        """))
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    msgs: list[str] = []

    def wait_msg(pred, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in msgs:
                if pred(m):
                    return m
            try:
                msgs.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no such notification; got {msgs}")

    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "4000000"}
    log = open(tmp_path / "daemon.log", "w+")
    d = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    pid_file = tmp_path / "agent.pid"
    pid_file.write_text(f"{d.pid}\n")

    def daemon_log():
        log.flush()
        return (tmp_path / "daemon.log").read_text()

    def wait_log(*words, timeout=30.0, after=0):
        """A log line (past line `after`) holding all the words: the reload line names
        the model's sha."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(all(w in ln for w in words) for ln in daemon_log().splitlines()[after:]):
                return
            assert d.poll() is None, daemon_log()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no line with {words} in the daemon log:\n{daemon_log()[-3000:]}")

    try:
        wait_msg(lambda m: "READY=1" in m)
        wait_log(sha["a"], timeout=1)
        wait_msg(lambda m: "WATCHDOG=1" in m, timeout=10)

        assert run(bundles["b"], "--models-dir", models, "--pid-file", pid_file) == 0
        wait_log("reload", sha["b"])
        wait_msg(lambda m: "RELOADING=1" in m)
        n = len(msgs)

        bad = copy_bundle(bundles["a"], tmp_path / "tampered")
        (bad / "model.tflite").write_bytes((bad / "model.tflite").read_bytes() + b"x")
        assert run(bad, "--models-dir", models, "--pid-file", pid_file) == 2
        time.sleep(0.5)
        assert not any("RELOADING=1" in m for m in msgs[n:])   # the agent was not disturbed

        n_lines = len(daemon_log().splitlines())
        assert run("--rollback", "--models-dir", models, "--pid-file", pid_file) == 0
        wait_log("reload", sha["a"], after=n_lines)
        assert d.poll() is None

        d.send_signal(signal.SIGTERM)
        wait_msg(lambda m: "STOPPING=1" in m)
        assert d.wait(timeout=30) == 0, daemon_log()[-3000:]
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
        sock.close()
        log.close()
