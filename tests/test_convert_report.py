"""convert.report (the pictures) and what `edge-inspect evaluate` adds for judging a model apart
from its threshold (roc_auc, operating_points, --report). No TensorFlow: the demo bundle runs
through LiteRT."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from convert import evaluate as ev
from convert.report import FIGURES, ScoredSet, gallery_indices, write_report
from convert.threshold import OPERATING_POINTS, operating_points, roc_auc

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"
BUNDLE = DEMO / "bundle"


def _scored(n_good=30, n_def=30, maps=None, gray=True, seed=0) -> ScoredSet:
    rng = np.random.default_rng(seed)
    truth = ["good"] * n_good + ["scratch", "hole"] * (n_def // 2)
    scores = np.r_[rng.beta(2, 5, n_good), rng.beta(5, 2, n_def)]
    images = []
    for i in range(len(truth)):
        shape = (120, 160) if gray else (120, 160, 3)
        img = np.full(shape, 90 + (i % 5) * 20, np.uint8)
        cv2.circle(img, (80, 60), 20 + i % 15, (255, 255, 255) if not gray else 255, -1)
        images.append(img)
    if maps == "all":
        maps = [rng.random((8, 10)).astype(np.float32) for _ in truth]    # coarser than the image
    elif maps == "some":
        maps = [rng.random((15, 20)) * 7.0 if i % 2 else None for i in range(len(truth))]  # unscaled
    return ScoredSet(scores, truth, [f"img_{i:03d}.png" for i in range(len(truth))], images, maps)


HISTORY = [{"epoch": e, "loss": 1.0 / e, "val_loss": 1.2 / e, "val_auc": None if e == 1 else 0.8 + 0.02 * e}
           for e in range(1, 7)]


def _read_png(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} does not decode"
    return img


def _colourful(img: np.ndarray) -> float:
    """Share of pixels whose channels differ by more than 40 (gray images and black text: ~0)."""
    a = img.astype(np.int16)
    return float(((a.max(axis=2) - a.min(axis=2)) > 40).mean())


def test_report_files_html_and_key_figures(tmp_path):
    sc = _scored(maps="all")
    page = write_report(tmp_path, title="unit <test>", history=HISTORY, scored=sc, threshold=0.5,
                        max_escape=0.02, labels=["good", "hole", "scratch"], good="good")
    assert page == tmp_path / "report" / "index.html" and page.is_file()
    text = page.read_text()
    for name in FIGURES:
        f = tmp_path / "report" / name
        assert f.is_file(), name
        assert f"href='{name}'" in text, f"index.html does not link {name}"
        img = _read_png(f)
        assert img.shape[0] >= 200 and img.shape[1] >= 300, (name, img.shape)
        assert img.std() > 10, f"{name} is (nearly) blank"
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, name
    # self-contained: every figure embedded, not only linked
    assert text.count("src='data:image/png;base64,") == len(FIGURES)
    assert "unit &lt;test&gt;" in text                      # the title, escaped
    # the key figures, as text, computed independently here
    is_def = np.array([t != "good" for t in sc.truth])
    auc = roc_auc(sc.scores, is_def)
    assert 0.5 < auc < 1.0
    assert f"{auc:.4f}" in text
    esc = np.mean(sc.scores[is_def] < 0.5)
    fr = np.mean(sc.scores[~is_def] >= 0.5)
    acc = np.mean((sc.scores >= 0.5) == is_def)
    for v in (esc, fr, acc):
        assert f"{100 * v:.2f} %" in text
    # confusion table: good first, then the defect classes in the bundle's label order
    conf = re.search(r"<table id='confusion'>(.*?)</table>", text, re.S).group(1)
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td></tr>", conf)
    assert [r[0] for r in rows] == ["good", "hole", "scratch"]
    assert int(rows[0][2]) == int((sc.scores[~is_def] >= 0.5).sum())
    assert sum(int(a) + int(b) for _, a, b in rows) == len(sc.truth)


def test_scores_csv_holds_every_image_as_scored(tmp_path):
    sc = _scored()
    sc.sources = ["validation"] * 20 + ["out-of-fold 1"] * 40
    page = write_report(tmp_path, title="t", history=None, scored=sc, threshold=0.5,
                        max_escape=0.02, labels=["good", "hole", "scratch"], good="good")
    assert "href='scores.csv'" in page.read_text()
    with (tmp_path / "report" / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == sc.files
    assert np.allclose([float(r["score"]) for r in rows], sc.scores, atol=1e-6)
    assert [r["defect"] == "1" for r in rows] == [t != "good" for t in sc.truth]
    assert [r["verdict"] for r in rows] == ["reject" if v >= 0.5 else "pass" for v in sc.scores]
    assert [r["source"] for r in rows] == sc.sources


def test_no_history_no_history_figure_and_a_second_run_replaces(tmp_path):
    sc = _scored()
    write_report(tmp_path, title="t", history=HISTORY, scored=sc, threshold=0.5, max_escape=None,
                 labels=["good", "hole", "scratch"], good="good")
    assert (tmp_path / "report" / "history.png").is_file()
    page = write_report(tmp_path, title="t", history=None, scored=sc, threshold=0.5, max_escape=None,
                        labels=["good", "hole", "scratch"], good="good")
    assert not (tmp_path / "report" / "history.png").exists()   # no stale curves of another run
    text = page.read_text()
    assert "history.png" not in text
    pngs = set(re.findall(r"href='([\w.]+\.png)'", text))
    assert pngs == set(FIGURES) - {"history.png"}
    assert pngs == {p.name for p in (tmp_path / "report").glob("*.png")}


def test_gallery_shows_the_threshold_setters_and_worst_false_rejects():
    sc = _scored()
    low, high = gallery_indices(sc, "good", k=5)
    d = [i for i, t in enumerate(sc.truth) if t != "good"]
    g = [i for i, t in enumerate(sc.truth) if t == "good"]
    assert [sc.truth[i] != "good" for i in low] == [True] * 5
    assert sorted(sc.scores[low]) == sorted(np.sort(sc.scores[d])[:5])
    assert list(sc.scores[high]) == list(np.sort(sc.scores[g])[::-1][:5])


def test_gallery_with_and_without_maps(tmp_path):
    # gray images: without maps the galleries are gray (bar a red title or two); the heat map
    # overlay colours them, whatever the map's resolution and scale, and None entries are skipped
    kw = dict(title="t", history=None, threshold=0.5, max_escape=0.01, labels=["good", "hole", "scratch"],
              good="good")
    colour = {}
    for mode in (None, "all", "some"):
        out = tmp_path / str(mode)
        write_report(out, scored=_scored(maps=mode), **kw)
        colour[mode] = [_colourful(_read_png(out / "report" / f))
                        for f in ("gallery_threshold.png", "gallery_false_rejects.png")]
    assert max(colour[None]) < 0.02, colour
    assert min(colour["all"]) > 0.2, colour
    assert 0.05 < min(colour["some"]) and max(colour["some"]) < max(colour["all"]), colour
    # BGR images are shown as RGB: a pure-blue BGR image must come out blue, not red
    sc = _scored(gray=False)
    for im in sc.images:
        im[:] = (255, 0, 0)
    out = tmp_path / "bgr"
    write_report(out, scored=sc, **kw)
    img = _read_png(out / "report" / "gallery_threshold.png").reshape(-1, 3).astype(int)   # BGR
    blue = (img[:, 0] > 200) & (img[:, 2] < 60)
    red = (img[:, 2] > 200) & (img[:, 0] < 60)
    assert blue.mean() > 0.3 and blue.sum() > 10 * red.sum()


def test_scored_set_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 scores but 2 truth"):
        ScoredSet(np.zeros(3), ["good", "x"], ["a", "b", "c"], [np.zeros((2, 2), np.uint8)] * 3)
    with pytest.raises(ValueError, match="no images"):
        ScoredSet(np.zeros(0), [], [], [])


def test_one_class_only_still_draws(tmp_path):
    sc = _scored(n_def=0)
    page = write_report(tmp_path, title="t", history=None, scored=sc, threshold=0.5, max_escape=None,
                        labels=["good", "defect"], good="good")
    assert "undefined" in page.read_text()
    assert _read_png(tmp_path / "report" / "gallery_threshold.png").std() > 1


# --- evaluate -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_demo(tmp_path_factory) -> Path:
    """The demo images as class folders, with three defects filed as good (label noise): the
    model's AUC is then below 1 and the operating-point table is not trivially flat."""
    data = tmp_path_factory.mktemp("demo") / "data"
    (data / "good").mkdir(parents=True)
    (data / "defect").mkdir()
    names = sorted(os.listdir(DEMO / "images"))
    for name in names:
        shutil.copy(DEMO / "images" / name, data / ("good" if name.startswith("good_") else "defect") / name)
    for name in [n for n in names if n.startswith("defect_")][:3]:
        shutil.copy(DEMO / "images" / name, data / "good" / f"mislabelled_{name}")
    return data


def _direct_scores(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's scores computed here, without evaluate's main()."""
    from agent.bundle import load_bundle
    from agent.runtime.engines import create_engine
    from convert.data import load_split, scan_eval

    b = load_bundle(BUNDLE)
    eng = create_engine("cpu", b.model_path, b.input, len(b.labels), threads=1)
    _, truth, images, _ = load_split(scan_eval(data), "test")
    scores, _, _ = ev.run_engine(eng, b, images)
    return np.array(scores), np.array([t != "good" for t in truth])


def test_evaluate_json_roc_auc_and_operating_points(noisy_demo, capsys):
    assert ev.main(["edge-inspect evaluate", str(BUNDLE), str(noisy_demo), "--json", "--threads", "1"]) == 0
    m = json.loads(capsys.readouterr().out)
    s, d = _direct_scores(noisy_demo)
    pairs = sum((a > b) + 0.5 * (a == b) for a in s[d] for b in s[~d])     # by definition
    assert 0.0 <= m["roc_auc"] <= 1.0
    assert m["roc_auc"] == pytest.approx(pairs / (d.sum() * (~d).sum()))
    assert m["roc_auc"] < 1.0                          # the mislabelled copies score as defects
    pts = m["operating_points"]
    assert [p["max_escape"] for p in pts] == sorted(OPERATING_POINTS) == [0.005, 0.01, 0.02, 0.03, 0.05]
    assert pts == operating_points(s, d, OPERATING_POINTS)
    for a, b in zip(pts, pts[1:]):                   # a looser escape target never costs more
        assert a["threshold"] <= b["threshold"]
        assert a["escape_rate"] <= b["escape_rate"]
        assert a["false_reject_rate"] >= b["false_reject_rate"]
    for p in pts:
        assert p["escape_rate"] <= p["max_escape"] + 1e-9
        assert p["false_reject_rate"] == pytest.approx(np.mean(s[~d] >= p["threshold"]))
    assert pts[0]["false_reject_rate"] > 0             # 3 "good" parts the model calls defects
    assert "report" not in m


def test_evaluate_float_shows_what_int8_costs(noisy_demo, capsys, tmp_path):
    from agent.bundle import FLOAT_MODEL, load_bundle
    from agent.runtime.engines import create_engine
    from convert.data import load_split, scan_eval

    assert ev.main(["edge-inspect evaluate", str(BUNDLE), str(noisy_demo), "--json", "--threads", "1",
                    "--float"]) == 0
    m = json.loads(capsys.readouterr().out)
    b = load_bundle(BUNDLE)
    _, truth, images, _ = load_split(scan_eval(noisy_demo), "test")
    s8, _, _ = ev.run_engine(create_engine("cpu", b.model_path, b.input, len(b.labels), threads=1), b, images)
    sf, _, _ = ev.run_engine(create_engine("cpu", b.file(FLOAT_MODEL), b.input, len(b.labels), threads=1),
                              b, images)
    s8, sf = np.array(s8), np.array(sf)
    assert not np.array_equal(s8, sf)                  # two models, not one scored twice
    f = m["float"]
    d = np.array([t != "good" for t in truth])
    assert f["accuracy"] == pytest.approx(np.mean((sf >= b.threshold) == d))
    assert f["roc_auc"] == pytest.approx(roc_auc(sf, d))
    assert f["verdict_agreement"] == pytest.approx(np.mean((s8 >= b.threshold) == (sf >= b.threshold)))
    assert f["score_difference_mean"] == pytest.approx(np.mean(np.abs(s8 - sf)), abs=1e-6)
    assert m["accuracy"] == pytest.approx(np.mean((s8 >= b.threshold) == d))     # int8 unchanged
    # text mode says it in one line
    assert ev.main(["edge-inspect evaluate", str(BUNDLE), str(noisy_demo), "--threads", "1", "--float"]) == 0
    assert "float32 model:" in capsys.readouterr().out
    # a bundle without the float model: one line, exit 2
    bare = tmp_path / "bare"
    shutil.copytree(BUNDLE, bare)
    meta = json.loads((bare / "bundle.json").read_text())
    (bare / FLOAT_MODEL).unlink()
    meta["files"] = {k: v for k, v in meta.get("files", {}).items() if k != FLOAT_MODEL}
    (bare / "bundle.json").write_text(json.dumps(meta))
    assert ev.main(["edge-inspect evaluate", str(bare), str(noisy_demo), "--float"]) == 2
    assert "carries no model_float.tflite" in capsys.readouterr().err


def test_evaluate_refuses_a_model_whose_output_is_not_finite(noisy_demo, capsys, monkeypatch):
    import agent.runtime.engines as engines
    from agent.runtime.inspector import WrappedEngine

    real = engines.create_engine

    class NaNs(WrappedEngine):
        def invoke(self, px):
            out = np.array(self.inner.invoke(px), np.float32)
            out[..., 0] = np.nan
            return out

    monkeypatch.setattr(engines, "create_engine", lambda *a, **k: NaNs(real(*a, **k)))
    assert ev.main(["edge-inspect evaluate", str(BUNDLE), str(noisy_demo), "--json", "--threads", "1"]) == 2
    err = capsys.readouterr()
    assert "not finite" in err.err and "cannot be evaluated" in err.err and not err.out


def test_evaluate_text_prints_auc_and_table(noisy_demo, capsys):
    assert ev.main(["edge-inspect evaluate", str(BUNDLE), str(noisy_demo), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    auc = re.search(r"ROC AUC:\s+([0-9.]+)", out)
    assert auc and 0.0 < float(auc.group(1)) < 1.0
    rows = re.findall(r"^\s+(\d+\.\d) %\s+([0-9.]+)\s+([0-9.]+) %\s+([0-9.]+) %$", out, re.M)
    assert [r[0] for r in rows] == ["0.5", "1.0", "2.0", "3.0", "5.0"], out


def test_evaluate_without_report_never_imports_matplotlib(noisy_demo):
    code = ("import sys; from convert.evaluate import main; "
            f"rc = main(['evaluate', {str(BUNDLE)!r}, {str(noisy_demo)!r}, '--json', '--threads', '1']); "
            "assert 'matplotlib' not in sys.modules, 'evaluate imported matplotlib'; "
            "assert 'tensorflow' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "roc_auc" in json.loads(r.stdout)


def test_evaluate_report_via_the_console_script(noisy_demo, tmp_path):
    script = Path(sys.executable).parent / "edge-inspect"
    exe = str(script) if script.exists() else shutil.which("edge-inspect")
    assert exe, "the edge-inspect console script is not installed (pip install -e .)"
    out = tmp_path / "out"
    r = subprocess.run([exe, "evaluate", str(BUNDLE), str(noisy_demo), "--json", "--threads", "1",
                        "--report", str(out)], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    page = out / "report" / "index.html"
    assert m["report"] == str(page) and page.is_file()
    text = page.read_text()
    assert f"{m['roc_auc']:.4f}" in text
    assert f"{100 * m['false_reject_rate']:.2f} %" in text
    assert f"{m['threshold']:.4f}" in text and "escape &le; 1 %" in text     # the bundle's target
    for name in set(FIGURES) - {"history.png"}:
        assert f"href='{name}'" in text
        assert _read_png(out / "report" / name).std() > 10
    assert not (out / "report" / "history.png").exists()
    # an unwritable report place: one line, exit 2, no traceback
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([exe, "evaluate", str(BUNDLE), str(noisy_demo), "--threads", "1",
                        "--report", str(blocker)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "report" in r.stderr, r.stderr


def test_policy_table_scores_each_recorded_threshold_as_evaluate_does(noisy_demo, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from policy_table import policy_rows

    b = tmp_path / "bundle"
    shutil.copytree(BUNDLE, b)
    m = json.loads((b / "bundle.json").read_text())
    t0 = m["threshold"]
    m["metrics"]["threshold_selection"] = {"on": "hand-set", "operating_points": [
        {"max_escape": 0.01, "threshold": 0.05, "false_reject_rate": 0.5},
        {"max_escape": 0.05, "threshold": t0, "false_reject_rate": 0.1}]}
    (b / "bundle.json").write_text(json.dumps(m))
    r = policy_rows(b, noisy_demo, threads=1)
    assert [q["threshold"] for q in r["rows"]] == [0.05, t0]
    for q in r["rows"]:
        assert ev.main(["edge-inspect evaluate", str(b), str(noisy_demo), "--json", "--threads", "1",
                        "--threshold", str(q["threshold"])]) == 0
        e = json.loads(capsys.readouterr().out)
        assert (q["accuracy"], q["escape_rate"], q["false_reject_rate"]) == \
            (pytest.approx(e["accuracy"]), pytest.approx(e["escape_rate"]), pytest.approx(e["false_reject_rate"]))
    assert r["rows"][0]["false_reject_rate"] > r["rows"][1]["false_reject_rate"]   # a lower threshold rejects more


def test_policy_table_pools_rechoose_each_threshold_on_its_own_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from convert.threshold import select_threshold
    from policy_table import POOL_TARGETS, held_out_pools, pool_rows

    rng = np.random.default_rng(0)
    rows = [("validation", rng.uniform(0, 0.4, 30), rng.uniform(0.5, 1.0, 10)),
            ("out-of-fold 1", rng.uniform(0, 0.6, 60), rng.uniform(0.3, 1.0, 20))]
    f = tmp_path / "scores.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "truth", "defect", "score", "verdict", "source"])
        for src, good, bad in rows:
            w.writerows([f"g{k}.png", "good", 0, repr(float(s)), "pass", src] for k, s in enumerate(good))
            w.writerows([f"d{k}.png", "crack", 1, repr(float(s)), "reject", src] for k, s in enumerate(bad))
    pools = held_out_pools(f)
    assert {k: len(v[0]) for k, v in pools.items()} == {"validation": 40, "out-of-fold": 80, "both": 120}
    test_s, test_d = np.r_[rng.uniform(0, 0.5, 50), rng.uniform(0.4, 1.0, 50)], np.r_[[False] * 50, [True] * 50]
    out = pool_rows(pools, test_s, test_d)
    assert len(out) == 3 * len(POOL_TARGETS)
    for q in out:
        s, d = pools[q["pool"]]
        t = select_threshold(s, d, q["max_escape"])
        assert q["threshold"] == t
        assert q["escape_rate"] == pytest.approx(float((test_s[test_d] < t).mean()))
    # the validation rows separate cleanly, the out-of-fold rows overlap: their thresholds differ
    at2 = {q["pool"]: q["threshold"] for q in out if q["max_escape"] == 0.02}
    assert at2["out-of-fold"] < at2["validation"]
