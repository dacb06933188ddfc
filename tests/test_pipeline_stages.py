"""The pipeline's stages one by one (agent/runtime/capture.py, actuator.py, stats.py, types.py):
a real folder source that vanishes and comes back, the null gate and a gate that raises,
the tiny int8 bundle on real PNG files."""

from __future__ import annotations

import shutil
import threading
import time

from prometheus_client import generate_latest

from agent.runtime.actuator import Actuator
from agent.runtime.capture import ReconnectingSource, SourceState
from agent.runtime.inspector import Inspector
from agent.runtime.pipeline import Pipeline
from agent.report.prom import PromMetrics
from agent.report.reporter import event_payload
from agent.runtime.sources import FolderSource, open_source
from agent.runtime.stats import PipelineStats
from agent.types import Action, FailsafeReason, Verdict
from firmware_io.gates import NoneGateConfig, create_gate
from tests.support import make_folder, tiny_bundle


def test_reconnecting_source_backs_off_until_the_folder_exists_then_ends(tmp_path):
    folder = tmp_path / "imgs"
    states, got = [], []
    cap = ReconnectingSource(FolderSource(str(folder)), reconnect_min_s=0.02, reconnect_max_s=0.08,
                             on_state=lambda c, s, r: states.append((c, s, r)))
    stop = threading.Event()
    th = threading.Thread(target=cap.run, args=(got.append, stop), daemon=True)
    th.start()
    time.sleep(0.3)
    assert cap.state is SourceState.DEGRADED and cap.waiting and "does not exist" in cap.reason
    assert cap.backoff.current == 0.08                 # doubled up to its cap, not beyond
    make_folder(tmp_path / "staging", "gdg")
    (tmp_path / "staging").rename(folder)             # appears whole, as a mount would
    th.join(5)
    assert not th.is_alive() and cap.ended and cap.state is SourceState.ENDED
    assert [g.ref for g in got] == sorted(p.name for p in folder.iterdir())
    assert cap.backoff.current == 0.02                 # reset by the first frame
    assert [s for _, s, _ in states] == ["degraded", "connected", "ended"]
    assert all(c == "source" for c, _, _ in states)


def test_reconnecting_source_paces_a_file_to_fps(tmp_path):
    make_folder(tmp_path / "imgs", "g" * 10)
    got = []
    cap = ReconnectingSource(open_source(str(tmp_path / "imgs")), fps=50)
    t0 = time.monotonic()
    cap.run(got.append, threading.Event())
    assert len(got) == 10 and time.monotonic() - t0 >= 9 / 50 - 0.01
    gaps = [(b.t_capture_ns - a.t_capture_ns) / 1e6 for a, b in zip(got, got[1:])]
    # 20 ms apart, not read at once (the median: one late wake-up on a busy box is made
    # up by the next read coming sooner)
    assert sorted(gaps)[len(gaps) // 2] > 15


def test_actuator_returns_the_action_it_took():
    gate = create_gate(NoneGateConfig(delay_ms=500))
    act = Actuator(gate, failsafe="reject")
    t = time.monotonic_ns()
    r = act.act("p-1", t, None, Verdict.REJECT)
    assert r.action is Action.REJECT and r.error is None and not r.failed
    assert [o.part_id for o in gate.records] == ["p-1"] and r.t_end_ns >= r.t_start_ns
    assert act.act("p-2", t, None, Verdict.PASS).action is Action.PASS
    assert act.act("p-3", t, None, Verdict.FAILSAFE).action is Action.REJECT
    act.failsafe = "pass"
    assert act.act("p-4", t, None, Verdict.FAILSAFE).action is Action.PASS
    assert [o.part_id for o in gate.records] == ["p-1", "p-3"]

    class Broken:
        def reject(self, *a):
            raise OSError("port gone")

        def accept(self, part):
            pass

    r = Actuator(Broken()).act("p-5", t, None, Verdict.REJECT)
    assert r.action is Action.REJECT and r.failed and r.error == "OSError: port gone"
    try:
        act.failsafe = "maybe"
    except ValueError as e:
        assert "'reject' or 'pass'" in str(e)
    else:
        raise AssertionError("a bad policy was taken")


def test_failsafe_reason_text_is_the_wire_format():
    R = FailsafeReason
    assert R.DEADLINE.text() == "deadline" and R.PAUSED.text("") == "paused"
    assert R.DECODE.text("corrupt image: cannot decode") == "decode_error: corrupt image: cannot decode"
    # details that already name their code (frame checks, selectors) are not prefixed twice
    assert R.BLANK.text("blank_frame: near-uniform") == "blank_frame: near-uniform"
    assert [r.value for r in R][:7] == ["deadline", "overload", "inference_error",
                                        "decode_error", "preprocess_error", "paused",
                                        "no_encoder"]


def test_inspections_carry_reason_and_action_and_one_snapshot_feeds_all(tmp_path):
    truth = make_folder(tmp_path / "imgs", "gdgdg")
    shutil.copy(tmp_path / "imgs" / truth[0][0], tmp_path / "imgs" / "000a_copy.png")
    (tmp_path / "imgs" / "zz_corrupt.png").write_bytes(b"not an image")
    prom, got = PromMetrics(), []
    gate = create_gate(NoneGateConfig(delay_ms=500))
    pipe = Pipeline(open_source(str(tmp_path / "imgs")), Inspector.load(tiny_bundle(), threads=1),
                    gate=gate, sinks=[prom, got.append], failsafe="pass")
    pipe.start()
    assert pipe.wait(20)
    bad = got[-1]
    assert bad.verdict is Verdict.FAILSAFE and bad.failsafe_reason is FailsafeReason.DECODE
    assert bad.reason == "decode_error: corrupt image: cannot decode"
    assert bad.action is Action.PASS                   # the policy said pass: the gate did
    assert event_payload(bad, "st", "reject")["action"] == "pass"   # what was done, not guessed
    for g in got[:-1]:
        assert g.failsafe_reason is None and g.reason == ""
        assert g.action is (Action.REJECT if g.verdict is Verdict.REJECT else Action.PASS)
    snap = pipe.snapshot()
    assert isinstance(snap, PipelineStats) and snap.as_dict() == pipe.stats()
    assert snap.parts == len(got) == 7 and snap.failsafe_reasons == {"decode_error": 1}
    assert (snap.passed, snap.rejected, snap.failsafe) == (4, 2, 1)
    assert snap.source == "ended" and snap.mode == "frame" and snap.selector == {}
    prom.update(stats=snap, gate="connected")
    text = generate_latest(prom.registry).decode()
    assert 'edge_inspect_failsafes_total{reason="decode_error"} 1.0' in text
    assert 'edge_inspect_source_state{edge_inspect_source_state="ended"} 1.0' in text
    assert 'edge_inspect_trigger_mode{edge_inspect_trigger_mode="frame"} 1.0' in text
    assert 'edge_inspect_queue_depth{queue="inspect"} 0.0' in text
