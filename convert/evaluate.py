"""`edge-inspect evaluate BUNDLE_DIR DATA_DIR [--json] [--report DIR]`: measure a bundle on
labelled images.

Runs the bundle's int8 model through agent.preprocess and the agent's own engine, exactly as
the line does. TensorFlow is imported nowhere on this path, nor matplotlib unless --report
asks for the pictures (convert.report). Besides the figures at the bundle's threshold it gives
the ROC AUC and this set's operating-point table (the threshold each escape target would pick
on these very scores), so a model and a threshold policy can be judged apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from agent.bundle import BundleError, load_bundle
from agent.decide import decide
from agent.preprocess import VIEWS, preprocess

from .data import GOOD, DataError, load_split, scan_eval
from .threshold import OPERATING_POINTS, operating_points, rate_upper_bound, rates_at, roc_auc_or_none

log = logging.getLogger("convert.evaluate")


def verdict_metrics(truth: list[str], pred: list[str], good: str, labels: list[str]) -> dict:
    """Accuracy (good-vs-defect verdict), escape rate (defects passed as good), false-reject
    rate (good parts rejected), label accuracy and the confusion matrix truth x predicted."""
    t_def = np.array([t != good for t in truth])
    p_def = np.array([p != good for p in pred])
    n = len(truth)
    n_def, n_good = int(t_def.sum()), int((~t_def).sum())
    escapes = int((t_def & ~p_def).sum())
    false_rejects = int((~t_def & p_def).sum())
    truth_names = sorted(set(truth), key=lambda c: (c != good, c))
    pred_names = list(labels)
    conf = {tn: {pn: 0 for pn in pred_names} for tn in truth_names}
    for tn, pn in zip(truth, pred):
        conf[tn][pn] = conf[tn].get(pn, 0) + 1
    return {
        "n": n,
        "n_good": n_good,
        "n_defect": n_def,
        "accuracy": float((t_def == p_def).mean()) if n else 0.0,
        "label_accuracy": float(np.mean([a == b for a, b in zip(truth, pred)])) if n else 0.0,
        "escape_rate": escapes / n_def if n_def else 0.0,
        "escape_rate_upper_95": rate_upper_bound(escapes, n_def),     # 1.0: no defects, no evidence
        "false_reject_rate": false_rejects / n_good if n_good else 0.0,
        "escapes": escapes,
        "false_rejects": false_rejects,
        "confusion": conf,
    }


def run_engine(engine, bundle, images) -> tuple[list[float], list[str], float]:
    """(scores, labels, mean ms per image incl. preprocess) for decoded images."""
    scores, preds = [], []
    buf = np.empty(bundle.input.shape, dtype=np.uint8)
    t0 = time.perf_counter()
    for img in images:
        px = preprocess(img, bundle.input, out=buf)
        s, lbl = decide(engine.invoke(px), bundle, bundle.threshold)
        scores.append(s)
        preds.append(lbl)
    ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(images))
    return scores, preds, ms


def _float_engine(bundle, engine: str, threads: int):
    """The bundle's float32 TFLite model on the LiteRT CPU engine (EngineError if it has none)."""
    from agent.bundle import FLOAT_MODEL
    from agent.runtime.engines import EngineError, create_engine

    if bundle.kind == "anomaly":
        raise EngineError("an anomaly bundle has no float model to compare")
    if engine != "cpu":
        raise EngineError(f"the float model runs on the cpu engine; drop --engine {engine}")
    path = bundle.file(FLOAT_MODEL)
    if path is None:
        raise EngineError(f"bundle {bundle.path} carries no {FLOAT_MODEL} (trained with --no-float)")
    return create_engine("cpu", path, bundle.input, len(bundle.labels), threads=threads)


def float_comparison(engine, bundle, images, is_def, scores8) -> dict:
    """The float model on the same images at the same threshold, and how often int8 and float
    give a part a different verdict: int8's own cost, apart from the model and the threshold
    policy (the trainer checks it on validation, metrics.parity; this is the test set)."""
    scores, _, ms = run_engine(engine, bundle, images)
    s8, sf, t = np.asarray(scores8), np.asarray(scores), bundle.threshold
    return {**rates_at(sf, is_def, t), "roc_auc": roc_auc_or_none(sf, is_def), "ms_per_image": ms,
            "verdict_agreement": float(np.mean((s8 >= t) == (sf >= t))),
            "score_difference_mean": float(np.mean(np.abs(s8 - sf))),
            "score_difference_p99": float(np.percentile(np.abs(s8 - sf), 99))}


def _format_text(m: dict, bundle) -> str:
    lines = [f"bundle {bundle.path}  (threshold {bundle.threshold:.4f}, {bundle.input.views} view(s), "
             f"model {bundle.model_sha256[:12]}, engine {m.get('engine', 'cpu')})",
             f"images: {m['n']} ({m['n_good']} good, {m['n_defect']} defect)"
             + (f", {m['unreadable']} unreadable skipped" if m.get("unreadable") else ""),
             f"accuracy:          {100 * m['accuracy']:.2f} %",
             f"escape rate:       {100 * m['escape_rate']:.2f} %  ({m['escapes']} defects passed as good; "
             f"at most {100 * m['escape_rate_upper_95']:.1f} % at 95 % confidence)",
             f"false-reject rate: {100 * m['false_reject_rate']:.2f} %  ({m['false_rejects']} good parts rejected)",
             f"label accuracy:    {100 * m['label_accuracy']:.2f} %",
             "ROC AUC:           " + ("undefined (needs good and defect images)" if m.get("roc_auc") is None
                                        else f"{m['roc_auc']:.4f}"),
             f"mean time:         {m['ms_per_image']:.2f} ms per image (decode excluded; preprocess + int8 inference)"]
    f = m.get("float")
    if f:
        auc = "undefined" if f["roc_auc"] is None else f"{f['roc_auc']:.4f}"
        lines += [f"float32 model:     accuracy {100 * f['accuracy']:.2f} %, escape {100 * f['escape_rate']:.2f} %, "
                  f"false reject {100 * f['false_reject_rate']:.2f} %, ROC AUC {auc}; same verdict as int8 "
                  f"for {100 * f['verdict_agreement']:.1f} % of parts (score difference mean "
                  f"{f['score_difference_mean']:.4f}, p99 {f['score_difference_p99']:.4f})"]
    if m.get("operating_points"):
        lines += ["operating points on this set (the threshold each escape target picks on these very "
                  "scores: the model, apart from the threshold policy):",
                  f"  {'escape target':>13}  {'threshold':>9}  {'escape':>8}  {'false reject':>12}"]
        lines += [f"  {100 * q['max_escape']:>11.1f} %  {q['threshold']:>9.4f}  {100 * q['escape_rate']:>6.2f} %"
                  f"  {100 * q['false_reject_rate']:>10.2f} %" for q in m["operating_points"]]
    lines.append("confusion (rows: truth, columns: predicted):")
    cols = list(next(iter(m["confusion"].values())).keys()) if m["confusion"] else []
    w = max([len(c) for c in cols + list(m["confusion"])] + [6]) + 2
    lines.append(" " * w + "".join(c.rjust(w) for c in cols))
    for tn, row in m["confusion"].items():
        lines.append(tn.ljust(w) + "".join(str(row.get(c, 0)).rjust(w) for c in cols))
    if m.get("report"):
        lines.append(f"report: {m['report']}")
    return "\n".join(lines)


def _write_report(out_dir: Path, engine, bundle, split, paths, truth, images, scores, good,
                  max_escape: float | None) -> Path:
    """convert.report's pictures of this evaluation. An engine that gives defect maps
    (`engine.maps(pixels)`, e.g. the anomaly engine) has them drawn over the gallery images,
    computed for those images only, where one map covers the whole image (1 tile, no ROI,
    stretched)."""
    from .report import ScoredSet, gallery_indices, write_report

    maps = None
    spec = bundle.input
    if (callable(getattr(engine, "maps", None)) and tuple(spec.tiles) == (1, 1) and spec.roi is None
            and spec.fit == "stretch"):
        scored = ScoredSet(np.asarray(scores), list(truth), [str(q) for q in paths], images)
        low, high = gallery_indices(scored, good)
        maps = [None] * len(images)
        buf = np.empty(spec.shape, dtype=np.uint8)
        for i in low + high:
            maps[i] = np.asarray(engine.maps(preprocess(images[i], spec, out=buf))[0], np.float32)
    scored = ScoredSet(np.asarray(scores), list(truth), [str(q) for q in paths], images, maps,
                       [f"{Path(split.root).name} (the bundle's int8 model)"] * len(images))
    title = f"{bundle.name or Path(bundle.path).name} on {split.root}"
    return write_report(out_dir, title=title, history=None, scored=scored,
                        threshold=bundle.threshold, max_escape=max_escape, labels=list(bundle.labels),
                        good=good)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0] if argv else "edge-inspect evaluate",
                                description="Measure a model bundle on a labelled image folder "
                                            "(class folders, or a folder holding test/).")
    p.add_argument("bundle", type=Path, help="bundle directory (from 'edge-inspect train')")
    p.add_argument("data", type=Path, help="class-folder directory, or one holding test/")
    p.add_argument("--json", action="store_true", help="print ONE JSON object on stdout")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default 2)")
    p.add_argument("--engine", default="cpu", metavar="NAME",
                   help="the agent's backend to score through, as [model] delegate: cpu (LiteRT, "
                        "default), edgetpu, onnx-cpu, cuda, tensorrt (the ONNX ones run the "
                        "bundle's model.onnx: convert-bundle)")
    p.add_argument("--device", default=None, help="the backend's device, as [model] device")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the bundle's decision threshold")
    p.add_argument("--views", type=int, choices=VIEWS, default=None,
                   help="mirror views per tile, at most the bundle's (default: the bundle's); "
                        "decides at the bundle's threshold for that many unless --threshold")
    p.add_argument("--float", action="store_true", dest="with_float",
                   help="also score the bundle's float32 model (model_float.tflite) on the same "
                        "images: what int8 costs, apart from the model and the threshold")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="also draw the pictures (ROC, escape vs false reject, confusion, galleries) "
                        "into DIR/report/ with an index.html; needs matplotlib (the train extra)")
    try:
        args = p.parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    prog = p.prog
    try:
        bundle = load_bundle(args.bundle).with_views(args.views)
        split = scan_eval(args.data)
    except (BundleError, DataError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.threshold is not None:
        if not 0.0 <= args.threshold <= 1.0:
            print(f"{prog}: --threshold must be within [0, 1]", file=sys.stderr)
            return 2
        bundle.threshold = args.threshold
    from agent.runtime.engines import ENGINES, EngineError, create_engine
    if args.engine not in ENGINES:
        print(f"{prog}: unknown --engine {args.engine!r}; known: {', '.join(sorted(ENGINES))}",
              file=sys.stderr)
        return 2
    try:
        if bundle.kind == "anomaly":
            if args.engine != "cpu":
                raise EngineError(f"an anomaly bundle runs on the cpu engine only, not {args.engine}")
            from agent.runtime.anomaly import AnomalyEngine
            engine = AnomalyEngine.from_bundle(bundle, threads=args.threads)
        else:
            model = bundle.model_path
            if args.engine == "edgetpu" and bundle.file("model_edgetpu.tflite") is not None:
                model = bundle.file("model_edgetpu.tflite")
            engine = create_engine(args.engine, model, bundle.input, len(bundle.labels),
                                   threads=args.threads, device=args.device)
    except EngineError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    float_engine = None
    if args.with_float:
        try:
            float_engine = _float_engine(bundle, args.engine, args.threads)
        except EngineError as e:
            print(f"{prog}: --float: {e}", file=sys.stderr)
            return 2
    paths, truth, images, bad = load_split(split, "evaluation")
    if not images:
        print(f"{prog}: no readable images under {split.root}", file=sys.stderr)
        return 2
    try:
        scores, preds, ms = run_engine(engine, bundle, images)
    except ValueError as e:            # agent.decide: an output that cannot be judged
        print(f"{prog}: {bundle.path}: {e}; this model cannot be evaluated (or deployed)", file=sys.stderr)
        return 2
    good = bundle.good_label if bundle.good_label in split.files or GOOD not in split.files else GOOD
    m = verdict_metrics(truth, preds, good, bundle.labels)
    m.update(kind=bundle.kind, ms_per_image=ms, unreadable=len(bad), threshold=bundle.threshold,
             views=bundle.input.views, bundle=str(bundle.path), data=str(split.root),
             model_sha256=bundle.model_sha256, engine=engine.describe())
    is_def = [t != good for t in truth]
    m.update(roc_auc=roc_auc_or_none(scores, is_def),
             operating_points=operating_points(scores, is_def, OPERATING_POINTS) if any(is_def) else [])
    if float_engine is not None:
        try:
            m["float"] = float_comparison(float_engine, bundle, images, is_def, scores)
        except ValueError as e:
            print(f"{prog}: {bundle.path}: float model: {e}", file=sys.stderr)
            return 2
    if args.report is not None:
        # the escape target the threshold was chosen for; none when --threshold overrides it
        max_escape = None if args.threshold is not None else \
            (bundle.metrics.get("threshold_selection") or {}).get("max_escape")
        try:
            m["report"] = str(_write_report(args.report, engine, bundle, split, paths, truth, images,
                                            scores, good, max_escape))
        except ImportError as e:
            print(f"{prog}: --report needs matplotlib (pip install 'edge-inspect[train]'): {e}",
                  file=sys.stderr)
            return 2
        except OSError as e:
            print(f"{prog}: cannot write the report into {args.report}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(m))
    else:
        print(_format_text(m, bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
