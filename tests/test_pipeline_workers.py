"""Several inspect workers (one interpreter each): every part still gets exactly one decision."""

import threading

import pytest

from agent.config import ConfigError, load_config
from agent.runtime.engines import EnginePool
from agent.runtime.inspector import Inspector
from agent.runtime.pipeline import IMAGE_BACKLOG, Pipeline
from agent.runtime.sources import open_source
from agent.types import Verdict
from firmware_io.gates import NoneGateConfig, create_gate
from tests.helpers import wait_until
from tests.support import make_folder, tiny_bundle


def test_two_workers_decide_every_part_once(tmp_path):
    truth = make_folder(tmp_path / "imgs", "gdgddggdgd" * 4)
    insp = Inspector.load(tiny_bundle(), threads=1, workers=2)
    assert isinstance(insp.engine, EnginePool) and len(insp.engine.engines) == 2
    gate = create_gate(NoneGateConfig(delay_ms=500))
    got = []
    pipe = Pipeline(open_source(str(tmp_path / "imgs")), insp, gate=gate, sinks=[got.append],
                    workers=2, keep_images=False)
    pipe.start()
    assert pipe.wait(30)
    assert sorted(r.source_ref for r in got) == [name for name, _ in truth]
    assert len({r.part_id for r in got}) == len(truth)
    want = {name: Verdict.REJECT if d else Verdict.PASS for name, d in truth}
    assert all(r.verdict is want[r.source_ref] for r in got)
    rejected = {r.part_id for r in got if r.verdict is Verdict.REJECT}
    assert sorted(o.part_id for o in gate.records) == sorted(rejected)   # one command each


def test_workers_need_the_cpu_delegate(write_config, tmp_path):
    path = write_config('[model]\nworkers = 2\ndelegate = "edgetpu"\n[gate]\nkind = "none"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, check_env=False)
    assert e.value.problems == ["model.workers: several inspect workers need delegate = 'cpu' "
                                "(one Edge TPU serves one interpreter)"]


def test_images_are_not_hoarded_while_the_output_thread_lags(tmp_path):
    """A slow report sink must not make the pipeline keep every ~1 MB frame in memory."""
    truth = make_folder(tmp_path / "imgs", "gd" * 30)
    insp = Inspector.load(tiny_bundle(), threads=1)
    release = threading.Event()
    got = []

    def slow_sink(rec):
        release.wait(10)          # the output thread is stuck until everything is captured
        got.append(rec.image is not None)

    pipe = Pipeline(open_source(str(tmp_path / "imgs")), insp, sinks=[slow_sink],
                    keep_images=True)
    pipe.start()
    assert wait_until(lambda: pipe.counts["parts"] == len(truth), timeout=20)
    release.set()
    assert pipe.wait(20)
    assert len(got) == len(truth)                       # every report still delivered
    assert sum(got) <= IMAGE_BACKLOG + 1                # but only a bounded number of images
    assert pipe.stats()["images_dropped"] == len(truth) - sum(got)
