"""Modbus RTU gate against pymodbus's own serial server, over two ptys joined by a relay."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
import tty
import warnings

import pytest

pytest.importorskip("pymodbus")

from pymodbus import FramerType  # noqa: E402
from pymodbus.server import ModbusSerialServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

from tests.helpers import wait_until  # noqa: E402
from firmware_io.gates import ModbusGateConfig, create_gate  # noqa: E402

MS = 1_000_000


class NullModem:
    """Two pty pairs with their masters cross-connected: a serial cable with a tty at
    each end (pymodbus's server and client each need a device path)."""

    def __init__(self):
        self.m1, self.s1 = os.openpty()
        self.m2, self.s2 = os.openpty()
        for fd in (self.m1, self.s1, self.m2, self.s2):
            tty.setraw(fd)
        self.a, self.b = os.ttyname(self.s1), os.ttyname(self.s2)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            r, _, _ = select.select([self.m1, self.m2], [], [], 0.05)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                    os.write(self.m2 if fd == self.m1 else self.m1, data)
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self._t.join(1)
        for fd in (self.m1, self.s1, self.m2, self.s2):
            try:
                os.close(fd)
            except OSError:
                pass


class ModbusServerThread:
    """pymodbus's RTU serial server in its own asyncio loop; records every write."""

    def __init__(self, port: str, device_id: int = 1):
        self.writes: list[tuple[int, int, int, list]] = []   # (ns, function code, addr, values)
        self.loop = asyncio.new_event_loop()

        async def action(fc, start, address, count, regs, set_values):
            if set_values is not None:
                self.writes.append((time.monotonic_ns(), fc, address, list(set_values)))
            return None

        bits = lambda: [SimData(0, count=16, datatype=DataType.BITS)]           # noqa: E731
        regs = lambda: [SimData(0, count=16, datatype=DataType.REGISTERS)]      # noqa: E731
        self.device = SimDevice(id=device_id, simdata=(bits(), bits(), regs(), regs()),
                                action=action)
        self.port = port
        self.server = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self._ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def main():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.server = ModbusSerialServer(self.device, framer=FramerType.RTU,
                                                 port=self.port, baudrate=115200)
            self._ready.set()
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except Exception:
            pass

    def stop(self):
        if self.server is not None:
            fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
            try:
                fut.result(3)
            except Exception:
                pass
        self._t.join(3)


@pytest.fixture
def modbus_rig():
    modem = NullModem()
    srv = ModbusServerThread(modem.a)
    yield srv, modem.b
    srv.stop()
    modem.close()


@pytest.mark.parametrize("target,fc", [("coil", 5), ("register", 6)])
def test_modbus_pulse_on_then_off_at_host_scheduled_time(modbus_rig, target, fc):
    srv, port = modbus_rig
    fired = []
    g = create_gate(ModbusGateConfig(port=port, modbus_target=target,
                                     modbus_addresses={1: 3, 2: 4}, delay_ms=150, pulse_ms=40),
                    on_fired=lambda *a: fired.append(a))
    g.open()
    try:
        assert wait_until(lambda: g.state() == "connected")
        t_cap = time.monotonic_ns()
        out = g.reject("M1", t_cap, gate=1)
        assert out.sent and not out.late and out.target.startswith("d")
        assert wait_until(lambda: len([w for w in srv.writes if w[1] == fc]) >= 2)
        (t_on, _, a_on, v_on), (t_off, _, a_off, v_off) = [w for w in srv.writes if w[1] == fc][:2]
        assert a_on == a_off == 3
        assert bool(v_on[0]) is True and bool(v_off[0]) is False       # on, then off
        on_err_ms = (t_on - (t_cap + 150 * MS)) / MS
        # never early, never short; the upper bounds only catch a gross error (not a
        # timing benchmark: a loaded CI box delays a thread's wake-up by tens of ms)
        assert -1 < on_err_ms < 100, on_err_ms                         # on at the target
        assert 35 <= (t_off - t_on) / MS < 250                         # a 40 ms pulse
        assert fired and fired[0][:2] == ("M1", 1)
        assert g.counters()["fired"] == 1 and g.fire_error_quantiles()["n"] == 1
    finally:
        g.close()


def test_modbus_gate_down_at_start_never_raises(tmp_path):
    g = create_gate(ModbusGateConfig(port=str(tmp_path / "nope"), reconnect_min_s=0.05,
                                     delay_ms=500))
    g.open()
    try:
        assert g.state() == "down"
        out = g.reject("X", time.monotonic_ns())
        assert not out.sent and out.error == "gate down"
    finally:
        g.close()
