"""Issue 20 item 3: a full disk must not drop alerts silently.

Two stand-ins for a full disk: SQLite's max_page_count (always available) and a real 2 MB
tmpfs holding the outbox and the recorder (needs mount rights: root, else skipped).

    .venv/bin/python -m pytest -q -s tests/test_disk_full.py   # -s prints the figures
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import prometheus_client
import pytest

from agent.commands.daemon import Agent
from agent.types import Verdict
from firmware_io.mqtt_link import MqttLink
from firmware_io.outbox import Outbox, OutboxFull
from tests.support import MqttCollector, agent_cfg, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"


def test_sqlite_full_is_reported_as_full_and_counted(tmp_path):
    ob = Outbox(tmp_path / "ob.sqlite")
    ob._db.execute("PRAGMA max_page_count = 24")          # a database that cannot grow
    stored, errors = 0, []
    for i in range(400):
        try:
            ob.put("t/events/reject", os.urandom(1500))
            stored += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    assert stored and errors
    assert all(isinstance(e, OutboxFull) for e in errors), {str(e) for e in errors}
    assert all("database or disk is full" in str(e) for e in errors)
    assert not any("no transaction is active" in str(e) for e in errors)
    assert ob.dropped_full == len(errors) and ob.depth() == stored and ob.disk_full
    rows = ob.after(0, 1000)
    assert len(rows) == stored                              # what was stored is intact
    ob.delete([r[0] for r in rows[:10]])                    # delivered: room again
    ob.put("t/events/reject", b"{}")
    assert ob.depth() == stored - 10 + 1


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(disk: Path) -> Path:
    """Something else on the box eats the disk (a log, a core dump) until ENOSPC."""
    p = disk / "filler"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 512):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return p


def test_full_disk_outbox_first_every_drop_counted(tmp_path, small_disk, own_broker):
    own_broker.stop()                                       # broker away: alerts pile up
    cfg = agent_cfg(tmp_path, DEMO / "images", broker=own_broker,
                    model={"bundle": str(DEMO / "bundle"), "threshold": 0.0},  # all rejects
                    camera={"loop": True, "fps": 60}, inspection={"deadline_ms": 2000},
                    mqtt={"outbox": str(small_disk / "outbox.sqlite"),
                          "outbox_reserve_mb": 0.5, "metrics_interval_s": 0.5},
                    recorder={"dir": str(small_disk / "rec"), "max_mb": 100,
                              "min_free_mb": 0.25, "pass_sample": 0.0},
                    frame_checks={"frozen_frames": 0})
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    try:
        assert (small_disk / "outbox.sqlite.reserve").stat().st_size == 512 * 1024
        wait_for(lambda: agent.recorder.saved >= 5, timeout=20, what="images recorded")
        filler = fill(small_disk)
        # the outbox takes its reserve; the recorder stops; then the reserve runs out too
        wait_for(lambda: agent.reporter.alerts_dropped["disk_full"] >= 20, timeout=60,
                 what="alerts refused by the full disk")
        assert agent.overall_state() == "degraded"
        time.sleep(0.6)                                     # one supervisor tick
        metrics = agent.metrics_payload()
        text = prometheus_client.generate_latest(agent.prom.registry).decode()
        # stop the agent on the full disk (as a restart would): then count
        agent.request_stop()
        th.join(20)
        assert not th.is_alive()
        alerts = [i for i in got if i.verdict is not Verdict.PASS]
        dropped = agent.reporter.alerts_dropped["disk_full"]
        ob = Outbox(small_disk / "outbox.sqlite")
        stored = ob.depth()
        ob.close()
        rec = agent.recorder.counters()
        print(f"\nalerts fired {len(alerts)}, stored {stored}, refused by the full disk "
              f"{dropped} (counted), recorder saved {rec['saved']} dropped {rec['dropped']}")
        # every alert is either in the outbox or counted as dropped: none lost silently
        assert stored + dropped == len(alerts)
        assert metrics["alerts_dropped"]["disk_full"] >= 20 and metrics["outbox_disk_full"]
        assert 'edge_inspect_alerts_dropped_total{reason="disk_full"}' in text
        assert "edge_inspect_outbox_disk_full 1.0" in text
        assert rec["dropped"].get("outbox_priority", 0) > 0   # recording stopped first
        assert stored > 0
        # space comes back, the broker returns, the agent restarts: all stored is delivered
        filler.unlink()
        own_broker.start()
        col = MqttCollector(own_broker.host, own_broker.port, "edge-inspect/test-st/events/#")
        time.sleep(0.3)
        link = MqttLink(cfg.mqtt, station=cfg.station.id)
        link.start()
        try:
            wait_for(lambda: link.outbox_depth() == 0, timeout=60, what="outbox drained")
            wait_for(lambda: len({m["part"] for m in col.on("events/reject")}) >= stored,
                     timeout=10, what="every stored alert delivered")
        finally:
            link.stop()
            col.close()
        delivered = {m["part"] for m in col.on("events/reject")}
        print(f"delivered after recovery: {len(delivered)} of {stored} stored")
        assert len(delivered) == stored
    finally:
        agent.request_stop()
        th.join(20)
