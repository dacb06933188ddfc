"""agent.report.notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from agent.report.notify import Notifier, Watchdog


class FakeSystemd:
    """Binds the datagram socket that NOTIFY_SOCKET names and collects what arrives."""

    def __init__(self, path):
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(2.0)

    def recv(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def drain(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives within `seconds`."""
        out, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(self.recv(timeout=left))
            except socket.timeout:
                break
        return out

    def close(self):
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    s = FakeSystemd(str(tmp_path / "notify.sock"))
    yield s
    s.close()


def test_disabled_without_notify_socket():
    n = Notifier(env={})
    assert not n.enabled and n.watchdog_interval_s is None
    n.ready("x"); n.status("y"); n.watchdog(); n.stopping(); n.reloading()  # no-ops, no errors
    w = Watchdog(n, stall_s=1)
    w.start(); w.progress(); w.stop()


def test_ready_status_stopping_arrive(systemd):
    n = Notifier(env={"NOTIFY_SOCKET": systemd.address})
    assert n.enabled and n.watchdog_interval_s is None
    n.ready("inspecting at 20 fps")
    assert systemd.recv() == {"READY": "1", "STATUS": "inspecting at 20 fps"}
    n.ready()
    assert systemd.recv() == {"READY": "1"}
    n.status("camera lost\nreconnecting")  # a newline must not forge a field
    assert systemd.recv() == {"STATUS": "camera lost reconnecting"}
    n.stopping()
    assert systemd.recv() == {"STOPPING": "1"}
    n.close()


def test_reloading_carries_monotonic_usec(systemd):
    n = Notifier(env={"NOTIFY_SOCKET": systemd.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    msg = systemd.recv()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_namespace_socket():
    name = f"edge-inspect-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        n.ready()
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_missing_socket_is_logged_not_raised(tmp_path, caplog):
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    n.ready()
    n.status("again")
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_unsupported_socket_kind_disables():
    n = Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled


def test_watchdog_usec_and_pid():
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    n = Notifier(env=base)
    assert n.watchdog_timeout_s == 30.0 and n.watchdog_interval_s == 15.0
    assert Notifier(env={**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 15.0
    # the watchdog is meant for another process (we inherited the environment): not ours
    assert Notifier(env={**base, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier(env={**base, "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
    assert Notifier(env={**base, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    # no socket: nothing to ping, whatever WATCHDOG_USEC says
    assert Notifier(env={"WATCHDOG_USEC": "30000000"}).watchdog_interval_s is None


def test_watchdog_pings_only_while_progressing(systemd, caplog):
    # WatchdogSec=0.2s -> ping period 0.1 s
    n = Notifier(env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000",
                      "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == pytest.approx(0.1)
    wd = Watchdog(n, stall_s=0.35)
    wd.start()
    try:
        # the pipeline processes a part every 50 ms for 0.8 s
        end = time.monotonic() + 0.8
        while time.monotonic() < end:
            wd.progress()
            time.sleep(0.05)
        pings = [m for m in systemd.drain(0.05) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 5, pings          # ~8 expected at a 0.1 s period
        assert not wd.stalled

        # the pipeline stalls: pings stop within stall_s (+ one period), then nothing
        time.sleep(0.5)
        systemd.drain(0.01)
        late = systemd.drain(0.6)
        assert [m for m in late if m.get("WATCHDOG")] == []
        assert wd.stalled
        assert any("pipeline stalled" in r.message for r in caplog.records)

        # progress resumes before systemd acted: pings resume
        for _ in range(6):
            wd.progress()
            time.sleep(0.05)
        assert any(m.get("WATCHDOG") == "1" for m in systemd.drain(0.15))
        assert not wd.stalled
    finally:
        wd.stop()
    # stopped: no more pings
    systemd.drain(0.15)
    assert systemd.drain(0.3) == []


def test_watchdog_catches_a_pipeline_that_never_starts(systemd):
    n = Notifier(env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "100000"})
    with Watchdog(n, stall_s=0.2) as wd:
        msgs = systemd.drain(0.7)
        assert wd.stalled
    pings = [m for m in msgs if m.get("WATCHDOG")]
    assert 1 <= len(pings) <= 5    # only during the first stall_s after start()
    assert any(m.get("STATUS", "").startswith("STALLED") for m in msgs)


def test_watchdog_without_systemd_watchdog_is_inert(systemd):
    n = Notifier(env={"NOTIFY_SOCKET": systemd.address})
    wd = Watchdog(n, stall_s=0.1)
    wd.start()
    time.sleep(0.3)
    wd.stop()
    assert systemd.drain(0.1) == []
    with pytest.raises(ValueError):
        Watchdog(n, stall_s=0)
