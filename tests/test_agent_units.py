"""Sources, inspector, pipeline, recorder, reporter and Prometheus pieces on their own
(real files, the real tiny model, a real HTTP scrape)."""

from __future__ import annotations

import json
import time
import urllib.request

import cv2
import numpy as np
import pytest

from agent.runtime.inspector import Inspector, InspectorError
from agent.commands.local_broker import free_port
from agent.runtime.pipeline import Pipeline, boot_prefix
from agent.report.prom import PromMetrics
from agent.report.recorder import Recorder
from agent.report.reporter import Reporter, event_payload
from agent.runtime.sources import (CaptureSource, FolderSource, SourceError, VideoFileSource,
                           open_source)
from agent.types import Verdict
from tests.support import copy_bundle, make_folder, make_image, make_video, tiny_bundle, wait_for


@pytest.fixture(scope="module")
def insp():
    return Inspector.load(tiny_bundle(), threads=1)


def drain(src):
    src.open()
    out = []
    while (got := src.read()) is not None:
        out.append(got)
        if len(out) > 100:
            break
    return out


def test_open_source_dispatch(tmp_path):
    make_folder(tmp_path / "f", "g")
    make_video(tmp_path / "v.avi", "g")
    assert isinstance(open_source(0), CaptureSource) and open_source("2").live
    assert isinstance(open_source("/dev/video7"), CaptureSource)
    assert isinstance(open_source("rtsp://10.0.0.1/cam"), CaptureSource)
    assert isinstance(open_source(str(tmp_path / "f")), FolderSource)
    assert isinstance(open_source(str(tmp_path / "v.avi")), VideoFileSource)
    with pytest.raises(SourceError):
        open_source("/dev/video-none").open()


def test_folder_sorted_refs_unchanged_decode_and_corrupt(tmp_path):
    d = tmp_path / "f"
    make_folder(d, "gd")
    cv2.imwrite(str(d / "002_sixteen.png"), (np.arange(48 * 64, dtype=np.uint16) * 20).reshape(48, 64))
    cv2.imwrite(str(d / "003_bgra.png"), np.full((40, 50, 4), 200, np.uint8))
    (d / "004_broken.png").write_bytes(b"not an image")
    (d / "notes.txt").write_text("ignored")
    got = drain(FolderSource(str(d)))
    assert [g.ref for g in got] == ["000_good.png", "001_defect.png", "002_sixteen.png",
                                    "003_bgra.png", "004_broken.png"]
    assert got[2].image.dtype == np.uint16               # IMREAD_UNCHANGED
    assert got[3].image.shape == (40, 50, 4)
    assert got[4].image is None and "corrupt" in got[4].error


def test_folder_loop_and_resume_after_vanishing(tmp_path):
    d = tmp_path / "f"
    make_folder(d, "ggg")
    src = FolderSource(str(d), loop=True)
    src.open()
    refs = [src.read().ref for _ in range(4)]
    assert refs == ["000_good.png", "001_good.png", "002_good.png", "000_good.png"]
    d.rename(tmp_path / "away")
    with pytest.raises(SourceError):
        src.read()
    with pytest.raises(SourceError):
        src.open()
    (tmp_path / "away").rename(d)
    src.open()
    assert src.read().ref == "001_good.png"             # carries on after the last one read


def test_video_file_end_loop_and_truncation(tmp_path):
    v = tmp_path / "v.avi"
    make_video(v, "gdgd")
    got = drain(VideoFileSource(str(v)))
    assert len(got) == 4 and got[0].ref == "v.avi#0" and got[0].image.shape == (48, 64, 3)
    src = VideoFileSource(str(v), loop=True)
    src.open()
    assert [src.read().ref for _ in range(6)][-2:] == ["v.avi#0", "v.avi#1"]
    v.write_bytes(b"")
    with pytest.raises(SourceError):
        for _ in range(4):
            src.read()


def test_inspector_refuses_tampered_bundle(tmp_path, insp):
    b = copy_bundle(tmp_path / "b")
    with open(b / "model.tflite", "ab") as f:
        f.write(b"!")
    with pytest.raises(InspectorError, match="corrupt or was changed"):
        Inspector.load(b)
    with pytest.raises(InspectorError, match="does not exist"):
        Inspector.load(tmp_path / "nope")
    assert insp.inspect(make_image(True, 1))[0] is Verdict.REJECT
    assert insp.inspect(make_image(False, 1))[0] is Verdict.PASS
    lo = insp.with_threshold(0.0)
    assert lo.engine is insp.engine and lo.inspect(make_image(False, 1))[0] is Verdict.REJECT
    with pytest.raises(InspectorError):
        insp.with_threshold(1.5)


class ListSource:
    live = False

    def __init__(self, images, delay_s=0.0):
        self.images = list(images)
        self.delay_s = delay_s

    def open(self):
        pass

    def read(self):
        from agent.runtime.sources import Captured

        if not self.images:
            return None
        img = self.images.pop(0)
        time.sleep(self.delay_s)
        t = time.monotonic_ns()
        return Captured(img, f"mem#{len(self.images)}", t, t)

    def close(self):
        pass

    def describe(self):
        return "mem"


def test_odd_frames_are_handled_by_the_spec_not_a_crash(insp):
    frames = [make_image(True, 2),                                   # gray
              cv2.cvtColor(make_image(True, 2), cv2.COLOR_GRAY2BGR),  # BGR
              np.dstack([make_image(True, 2)] * 4),                   # BGRA
              make_image(True, 2).astype(np.uint16) * 256,            # 16 bit
              np.zeros((480, 7), np.uint8) + 250,                     # odd size
              np.zeros((10, 10, 2), np.uint8),                        # 2 channels: unsupported
              np.zeros((0, 0), np.uint8)]                             # empty
    got = []
    p = Pipeline(ListSource(frames), insp, sinks=[got.append]).start()
    assert p.wait(10)
    assert [i.verdict for i in got[:5]] == [Verdict.REJECT] * 5
    assert [i.verdict for i in got[5:]] == [Verdict.FAILSAFE] * 2
    assert all(i.reason.startswith("preprocess_error") for i in got[5:])
    assert p.failsafes["preprocess_error"] == 2


def test_part_ids_unique_short_and_timings(insp):
    a, b = boot_prefix(), (time.sleep(0.002), boot_prefix())[1]
    assert a != b and len(a) <= 10 and a.isalnum()
    got = []
    p = Pipeline(ListSource([make_image(i % 2 == 0, i) for i in range(20)]), insp,
                 sinks=[got.append]).start()
    assert p.wait(10)
    ids = [i.part_id for i in got]
    assert len(set(ids)) == 20 and all(len(x) <= 20 and " " not in x for x in ids)
    assert [i.seq for i in got] == list(range(1, 21))
    for i in got:
        assert set(i.timings_ms) == {"decode", "preprocess", "queue", "invoke", "decide", "gate",
                                     "total"}
        assert i.latency_ms == i.timings_ms["total"] >= i.timings_ms["invoke"]
    s = p.stats()
    assert s["parts"] == 20 and s["reject"] == 10 and s["latency_ms"]["p99"] is not None


def test_swap_inspector_mid_run(insp):
    hi = insp.with_threshold(0.0)
    got = []
    p = Pipeline(ListSource([make_image(False, i) for i in range(40)], delay_s=0.005), insp,
                 sinks=[got.append], part_prefix="T").start()
    wait_for(lambda: len(got) >= 5)
    p.swap_inspector(hi)
    assert p.wait(20)
    assert got[0].verdict is Verdict.PASS and got[-1].verdict is Verdict.REJECT
    switch = next(k for k, i in enumerate(got) if i.threshold == 0.0)
    assert 5 <= switch < 39 and all(i.threshold == 0.0 for i in got[switch:])      # never back to the old one


def test_recorder_quota_deletes_oldest(tmp_path, insp):
    rec = Recorder(tmp_path / "rec", max_mb=0.02, pass_sample=1.0).start()  # ~20 KB
    got = []
    p = Pipeline(ListSource([make_image(i % 2 == 0, i, size=(64, 96)) for i in range(30)]), insp,
                 sinks=[got.append, Reporter("st", None, rec)]).start()
    assert p.wait(10)
    assert rec.wait_idle(5)
    rec.stop()
    files = sorted((tmp_path / "rec").rglob("*.*"))
    total = sum(f.stat().st_size for f in files)
    assert total <= 0.02 * 1024 * 1024 and rec.deleted > 0 and rec.saved == 30
    newest = got[-1].part_id
    assert any(f.stem == newest for f in files)                 # the newest survive
    assert not any(f.stem == got[0].part_id for f in files)     # the oldest went first
    js = next(f for f in files if f.suffix == ".json")
    rec_json = json.loads(js.read_text())
    assert rec_json["part"] == js.stem and rec_json["image_path"].endswith(js.stem + ".png")


def test_recorder_write_failure_is_counted_not_fatal(tmp_path, insp):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rec = Recorder(blocker / "sub", max_mb=10).start()        # cannot create: not a directory
    got = []
    p = Pipeline(ListSource([make_image(True, i) for i in range(5)]), insp,
                 sinks=[Reporter("st", None, rec), got.append]).start()
    assert p.wait(10)
    assert rec.wait_idle(5)
    rec.stop()
    assert len(got) == 5 and all(i.verdict is Verdict.REJECT for i in got)
    assert rec.saved == 0 and rec.dropped["write_error"] == 5


def test_event_payload_fields(insp):
    got = []
    p = Pipeline(ListSource([make_image(True, 3)]), insp, sinks=[got.append],
                 part_prefix="X").start()
    p.wait(5)
    e = event_payload(got[0], "st-1", "reject", "/tmp/x.png")
    assert e["part"] == "X-1" and e["verdict"] == "REJECT" and e["action"] == "reject"
    assert e["model_sha256"] == insp.model_sha256 and e["image_path"] == "/tmp/x.png"
    assert e["source_ref"] == "mem#0" and e["latency_ms"] > 0 and "invoke" in e["timings"]
    json.dumps(e)


def test_prometheus_own_registry_and_scrape(insp):
    m1, m2 = PromMetrics(), PromMetrics()                    # two daemons in one process
    got = []
    p = Pipeline(ListSource([make_image(i % 3 == 0, i) for i in range(9)] +
                            [np.zeros((3, 3, 2), np.uint8)]), insp,
                 sinks=[m1, got.append]).start()
    assert p.wait(10)
    m1.set_model(insp.info())
    m1.update(queues=p.queue_depths(), gate="connected", source="ended", mqtt="off",
              outbox=0, paused=False, recorder={"saved": 3, "dropped": {"disk_full": 1},
                                                "bytes": 10})
    port = free_port()
    m1.serve(port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m1.close()
    for needle in ('edge_inspect_frames_total 10.0', 'edge_inspect_verdicts_total{verdict="REJECT"} 3.0',
                   'edge_inspect_failsafes_total{reason="preprocess_error"} 1.0',
                   'edge_inspect_stage_seconds_bucket{le="0.001",stage="invoke"}',
                   'edge_inspect_queue_depth{queue="inspect"}',
                   'edge_inspect_gate_state{edge_inspect_gate_state="connected"} 1.0',
                   'edge_inspect_source_state{edge_inspect_source_state="ended"} 1.0',
                   'edge_inspect_model_info{', 'edge_inspect_threshold 0.5',
                   'edge_inspect_recorder_dropped_total{reason="disk_full"} 1.0'):
        assert needle in text, needle
    assert m2.registry.get_sample_value("edge_inspect_frames_total") == 0.0


def test_stalled_live_source_is_reported_degraded(insp):
    import threading

    release = threading.Event()

    class Stuck(ListSource):
        live = True

        def read(self):
            if len(self.images) == 2:
                release.wait(5)               # a camera that stops delivering
            return super().read()

    states = []
    got = []
    p = Pipeline(Stuck([make_image(False, i) for i in range(4)]), insp, sinks=[got.append],
                 stall_timeout_s=0.2, on_state=lambda c, s, r: states.append((s, r))).start()
    wait_for(lambda: len(got) == 2)
    time.sleep(0.3)
    assert p.check_stall() and p.source_state == "degraded"
    assert "stalled" in p.source_reason
    release.set()
    assert p.wait(5) and len(got) == 4
    assert [s for s, _r in states][:3] == ["connected", "degraded", "connected"]


def test_one_image_extension_list_for_agent_and_convert():
    # a folder the agent runs on is a folder convert trains on: the same files count as images
    import convert.data
    from agent import images
    from agent.commands import simulate_line
    from agent.runtime import sources
    assert convert.data.IMAGE_EXTS is images.IMAGE_EXTS
    assert sources.IMAGE_EXTS is images.IMAGE_EXTS and simulate_line.IMAGE_EXTS is images.IMAGE_EXTS
    assert all(e.startswith(".") and e == e.lower() for e in images.IMAGE_EXTS)


def test_tiny_bundle_separates_synthetic_images():
    from agent.bundle import load_bundle
    from agent.decide import defect_score
    from agent.runtime.engines import create_engine
    from agent.preprocess import preprocess

    b = load_bundle(tiny_bundle())
    eng = create_engine("cpu", b.model_path, b.input, len(b.labels), threads=1)
    for i in range(6):
        for defect in (False, True):
            score, label = defect_score(eng.invoke(preprocess(make_image(defect, i), b.input)), b)
            assert (score >= b.threshold) == defect, (i, defect, score)
            assert label == "defect"
