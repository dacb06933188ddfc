"""Shared helpers for the agent tests, imported as `tests.support` (not a test module).

`tiny_bundle()` builds a real full-int8 TFLite bundle with TensorFlow (tests may import TF;
the daemon may not) once per machine and caches it, so every module reuses it: a few-layer
Keras model, Rescaling(1/255) first, whose weights are set by hand so it separates the
synthetic images below (a bright spot = defect) without training.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() \
    else sys.executable

H = W = 32

_BUILD = r'''
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
sys.path.insert(0, sys.argv[2])
from agent.bundle import write_manifest
from agent.preprocess import InputSpec
out = sys.argv[1]
H = W = %d
inp = tf.keras.Input((H, W, 1), batch_size=1)
x = tf.keras.layers.Rescaling(1 / 255.0)(inp)
conv = tf.keras.layers.Conv2D(1, 3, padding="same", name="blur")
x = conv(x)
x = tf.keras.layers.GlobalMaxPooling2D()(x)
dense = tf.keras.layers.Dense(2, name="head")
x = dense(x)
x = tf.keras.layers.Softmax()(x)
m = tf.keras.Model(inp, x)
conv.set_weights([np.full((3, 3, 1, 1), 1 / 9, np.float32), np.zeros(1, np.float32)])
k = 20.0
dense.set_weights([np.array([[-k, k]], np.float32), np.array([k * 0.75, -k * 0.75], np.float32)])
class Serve(tf.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
    @tf.function(input_signature=[tf.TensorSpec([1, H, W, 1], tf.float32)])
    def __call__(self, t):
        return self.model(t)
serve = Serve(m)
# Freeze the variables: Keras 3 resource variables otherwise break int8 calibration
# ("READ_VARIABLE failed to invoke").
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
fn = convert_variables_to_constants_v2(serve.__call__.get_concrete_function())
rng = np.random.default_rng(0)
def rep():
    for i in range(32):
        img = rng.normal(120, 12, (1, H, W, 1)).clip(0, 255)
        if i %% 2:
            img[0, 8:16, 8:16, 0] = 250
        yield [img.astype(np.float32)]
conv_ = tf.lite.TFLiteConverter.from_concrete_functions([fn])
conv_.optimizations = [tf.lite.Optimize.DEFAULT]
conv_.representative_dataset = rep
conv_.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
conv_.inference_input_type = tf.uint8
conv_.inference_output_type = tf.uint8
open(os.path.join(out, "model.tflite"), "wb").write(conv_.convert())
write_manifest(__import__("pathlib").Path(out), labels=["good", "defect"], good_label="good",
               input_spec=InputSpec(width=W, height=H, channels=1, color="gray", fit="stretch"),
               threshold=0.5, metrics={"note": "hand-set weights"}, provenance={"by": "tests"},
               name="tiny-test")
''' % H


def _cache_root() -> Path:
    key = hashlib.sha256(_BUILD.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"edge-inspect-tiny-bundle-{key}"


def tiny_bundle() -> Path:
    """Path of the cached tiny bundle (read-only: copy it before tampering)."""
    root = _cache_root()
    done = root / "bundle" / "bundle.json"
    if done.exists():
        return root / "bundle"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not done.exists():
            tmp = root / f"build-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            subprocess.run([PY, "-c", _BUILD, str(tmp), str(ROOT)], check=True,
                           stdout=subprocess.DEVNULL, timeout=300)
            os.replace(tmp, root / "bundle")
    return root / "bundle"


def copy_bundle(dst: Path) -> Path:
    shutil.copytree(tiny_bundle(), dst)
    return dst


def make_image(defect: bool, seed: int, size=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 10, size).clip(0, 255).astype(np.uint8)
    if defect:
        y, x = 10 + seed % 20, 12 + seed % 30
        img[y:y + 12, x:x + 12] = 250
    return img


def make_folder(d: Path, pattern: str = "gdgdd", offset: int = 0) -> list[tuple[str, bool]]:
    """Images named good_NNN.png / defect_NNN.png; returns [(name, is_defect)] sorted."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, c in enumerate(pattern):
        defect = c == "d"
        name = f"{i + offset:03d}_{'defect' if defect else 'good'}.png"
        cv2.imwrite(str(d / name), make_image(defect, i + offset))
        out.append((name, defect))
    return sorted(out)


def make_video(path: Path, pattern: str, fps: float = 30.0) -> list[bool]:
    """An MJPG .avi of colour frames; frame i is a defect when pattern[i] == 'd'."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert vw.isOpened()
    for i, c in enumerate(pattern):
        vw.write(cv2.cvtColor(make_image(c == "d", i), cv2.COLOR_GRAY2BGR))
    vw.release()
    return [c == "d" for c in pattern]


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MqttCollector:
    """Subscribes to a topic filter on a broker and keeps (topic, json payload) pairs."""

    def __init__(self, host: str, port: int, topic: str = "#"):
        import json

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self._json = json
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"collector-{os.getpid()}-{id(self)}")
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
        self.c.connect(host, port)
        self.c.loop_start()

    def _on_message(self, c, u, msg):
        try:
            payload = self._json.loads(msg.payload) if msg.payload else None
        except ValueError:
            payload = msg.payload
        self.messages.append((msg.topic, payload))

    def on(self, suffix: str) -> list[dict]:
        return [p for t, p in list(self.messages) if t.endswith(suffix)]

    def close(self):
        with contextlib.suppress(Exception):
            self.c.loop_stop()
            self.c.disconnect()


def agent_cfg(tmp: Path, source, *, broker=None, gate_port: str | None = None, delay_ms=400,
              deadline_ms=250, **sections):
    """A validated agent Config for tests: sections override/extend the defaults."""
    from agent.config import parse_config

    raw = {
        "station": {"id": "test-st"},
        "camera": {"source": str(source), "reconnect_max_s": 0.5, "stall_timeout_s": 2},
        "model": {"bundle": str(tiny_bundle()), "threads": 1},
        "inspection": {"deadline_ms": deadline_ms, "queue_size": 2},
        "gate": ({"kind": "serial", "port": gate_port, "ack_timeout_ms": 50, "heartbeat_ms": 200,
                  **({"delay_ms": delay_ms} if delay_ms else {})} if gate_port
                 else {"kind": "none"}),
        "mqtt": ({"enabled": True, "host": broker.host, "port": broker.port,
                  "outbox": str(tmp / "outbox.sqlite"), "commands": True,
                  "metrics_interval_s": 1} if broker else {"enabled": False}),
        "metrics": {"port": 0},
        "recorder": {"dir": str(tmp / "rec"), "pass_sample": 0.0},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
        for key in [key for key, val in raw[k].items() if val is None]:
            del raw[k][key]
    return parse_config(raw, tmp)
