"""A bundle's models as ONNX, for ONNX Runtime and TensorRT (a Jetson): `model_float.onnx` and
`model.onnx` (int8, static QDQ), listed and hashed in bundle.json like every model file.

    edge-inspect convert-bundle BUNDLE --data TRAINING_FOLDER      # an existing bundle
    convert.onnx_export.add_onnx(bundle_dir, representative_uint8)  # the trainer

The float model is the bundle's float TFLite (or the Keras model the trainer passes) converted
by tf2onnx at a fixed opset. The int8 model is that float model quantized by ONNX Runtime's
static quantizer on the representative images, in QDQ form with symmetric int8 activations
and per-channel int8 weights: TensorRT compiles Q/DQ pairs to int8 only when the zero point is
0, and the int8 TFLite's own asymmetric uint8 activations (tf2onnx's direct route, kept as
`--int8-from tflite`) would leave TensorRT running those layers in float. Either way the int8
ONNX is checked against the int8 TFLite (the model the trainer measured) through the agent's
own engines: per input (top-1, the largest score difference) and per image as the line
decides (verdict and label), refused when the images' decisions disagree on more than the
bundle's parity margin. Per image, because that is what a plant gets: on a magnetic-tile
bundle the int8 logits tensor has 0.32-logit steps, and ORT's integer kernels round one step
differently on most inputs; that flips top-1 only on mirror views whose two best classes the
TFLite itself holds (near) tied (all 21 flips of 1616 inputs), and the mean over views
absorbs most of them (404 images: labels 99.26 %, verdicts 99.50 % agree; benchmarks/README.md).

Needs tf2onnx, onnx and onnxruntime (`pip install 'edge-inspect[onnx-export]'`); the edge box
needs only onnxruntime (or a Jetson's onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.bundle import (FLOAT_MODEL, INT8_MODEL, ONNX_FLOAT_MODEL, ONNX_MODEL, Bundle,
                          BundleError, add_files, load_bundle)
from agent.preprocess import add_views, preprocess

log = logging.getLogger("convert.onnx_export")

# Fixed, so a model exported today loads on the oldest runtime we document: opset 17 is the
# newest TensorRT 8.5 (JetPack 5) parses, and per-channel QDQ needs >= 13.
OPSET = 17
INT8_ROUTES = ("qdq", "tflite")
# auto: qdq when it passes parity (TensorRT runs it in int8), else the TFLite's own scales.
# On magnetic-tile (mt0) qdq agreed 97.59 % top-1 with the int8 TFLite and the direct route
# 98.95 %: a model whose float and int8 disagree on 6 % of inputs is re-quantized differently
# by any other calibration (benchmarks/README.md).
INT8_CHOICES = ("auto", *INT8_ROUTES)
REPRESENTATIVE = 200


class OnnxExportError(Exception):
    """No ONNX was added; the message says why (the bundle is unchanged)."""


def _tools():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise OnnxExportError(f"ONNX export needs tf2onnx, onnx and onnxruntime ({e.name} is "
                              "missing): pip install 'edge-inspect[onnx-export]'") from None


def tflite_to_onnx(tflite_path: Path, opset: int = OPSET):
    """tf2onnx's TFLite front end. It converts what it can and leaves the rest as TFL_ ops
    (continue_on_error): such a model cannot run, so it is refused here by name."""
    import onnx
    import tf2onnx

    model, _ = tf2onnx.convert.from_tflite(str(tflite_path), opset=opset)
    bad = sorted({n.op_type for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or n.op_type.startswith("TFL_")})
    if bad:
        raise OnnxExportError(f"tf2onnx could not convert these ops of {tflite_path.name}: "
                              f"{', '.join(bad)}")
    _float_output(model)
    onnx.checker.check_model(model)
    return model


def _float_output(model) -> None:
    """A quantized TFLite's uint8 output, dequantized in the graph (same scale and zero point
    as its last QuantizeLinear), so every ONNX model gives float probabilities."""
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    out = g.output[0]
    if out.type.tensor_type.elem_type != TensorProto.UINT8:
        return
    q = next((n for n in g.node if out.name in n.output), None)
    if q is None or q.op_type != "QuantizeLinear":
        raise OnnxExportError("the int8 model's output is uint8 but not from a QuantizeLinear")
    dims = [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim]
    g.node.append(helper.make_node("DequantizeLinear", [out.name, *q.input[1:3]], ["probs"]))
    g.output.remove(out)
    g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, dims))
    onnx.checker.check_model(model)


def save_model(model, path: Path) -> None:
    """Check and write an ONNX model, every constant owned by one node. onnxruntime's exact
    int8 mode (session.x64quantprecision, which agent.runtime.engines.onnxrt sets) rewrites
    each int8 node's constants in place and fails to load a graph where two nodes share one
    ("Attempt to replace the existing tensor", ORT 1.32): tf2onnx shares zero points and
    scales between the Q/DQ pairs it writes."""
    import copy

    import onnx

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    seen: dict[str, int] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in consts:
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    t = copy.deepcopy(consts[name])
                    t.name = f"{name}__{seen[name]}"
                    g.initializer.append(t)
                    node.input[k] = t.name
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _ramp(h: int, w: int, c: int) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w)[None, :, None], (h, 1, c)).round().astype(np.uint8)


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def quantize_qdq(float_path: Path, out_path: Path, images: np.ndarray) -> dict:
    """ONNX Runtime static quantization (MinMax) to QDQ, TensorRT's form: int8 activations
    with zero point 0, per-channel int8 weights. The ops before the first convolution (the
    pixel normalisation, gray-to-RGB) stay float, as their input is the raw 0..255 image: one
    symmetric int8 scale over it would halve the pixel resolution the TFLite model has."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    model = onnx.load(str(float_path))
    name = model.graph.input[0].name
    prologue = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            break
        prologue.append(n.name)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(images)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {name: x[None].astype(np.float32)}

    root = logging.getLogger()
    quiet = _Drop("pre-process")           # its advice to run a shape pre-pass, twice per call
    root.addFilter(quiet)
    try:
        quantize_static(str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=prologue,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    finally:
        root.removeFilter(quiet)
    return {"method": "onnxruntime quantize_static, MinMax, QDQ, int8 activations (symmetric) "
                      "and per-channel int8 weights", "float_prologue": len(prologue),
            "calibration_images": int(len(images))}


def _one_input(bundle: Bundle) -> Bundle:
    """The bundle as one model input sees it: one view, one tile."""
    return dataclasses.replace(bundle, input=dataclasses.replace(bundle.input, views=1,
                                                                 tiles=(1, 1)))


def _outputs(engine: str, path: Path, bundle: Bundle, inputs: np.ndarray,
             threads: int = 2) -> tuple[np.ndarray, float]:
    """The model's outputs on model inputs (N, H, W, C), one at a time, through the agent's
    engine, and the seconds the invokes took."""
    from agent.runtime.engines import create_engine

    eng = create_engine(engine, path, _one_input(bundle).input, len(bundle.labels),
                        threads=threads)
    t0 = time.perf_counter()
    out = np.concatenate([eng.invoke(x[None]) for x in inputs])
    return out, time.perf_counter() - t0


def parity(onnx_path: Path, tflite_path: Path, bundle: Bundle, images: np.ndarray,
           threads: int = 2, per_image: bool = False) -> dict:
    """The ONNX model against the int8 TFLite through the agent's own engines, on model
    inputs (N, H, W, C): top-1 agreement, the largest probability difference, and the
    largest defect-score difference (agent.decide's score, per input). With per_image (the
    inputs laid out image by image, tiles x views each, as images_from_data and the trainer
    give them), also what the line gets: each image decided as agent.decide does (views
    averaged, worst tile, the bundle's threshold), its verdict and label compared."""
    from agent.decide import defect_score

    po, t_onnx = _outputs("onnx-cpu", onnx_path, bundle, images, threads)
    pt = _outputs("cpu", tflite_path, bundle, images, threads)[0]
    n = len(bundle.labels)
    one = _one_input(bundle)
    so = np.array([defect_score(p[None], one)[0] for p in po])
    st = np.array([defect_score(p[None], one)[0] for p in pt])
    differ = np.nonzero(po.argmax(1) != pt.argmax(1))[0]
    # a uint8 output has 1/256 steps: where the TFLite's own top two are within two steps, a
    # one-step rounding difference flips top-1 without either model being wrong
    gap = pt[differ, pt[differ].argmax(1)] - pt[differ, po[differ].argmax(1)]
    out = {"n": int(len(images)),
           "top1_agreement": float(np.mean(po.argmax(1) == pt.argmax(1))),
           "disagreements": int(len(differ)),
           "disagreements_within_2_steps": int(np.sum(gap <= 2 / 256 + 1e-6)),
           "max_prob_diff": float(np.abs(po - pt).max()),
           "max_score_diff": float(np.abs(so - st).max()),
           "mean_score_diff": float(np.abs(so - st).mean()),
           "onnx_cpu_ms_per_input": round(1000 * t_onnx / max(1, len(images)), 3)}
    k = bundle.input.batch
    if per_image and len(images) % k == 0:
        out["images"] = _image_parity(po.reshape(-1, k, n), pt.reshape(-1, k, n), bundle)
    return out


def _image_parity(po: np.ndarray, pt: np.ndarray, bundle: Bundle) -> dict:
    from agent.decide import decide

    o, t = ([decide(p, bundle, bundle.threshold) for p in ps] for ps in (po, pt))
    good = bundle.good_label
    return {"n": len(o),
            "label_agreement": float(np.mean([a[1] == b[1] for a, b in zip(o, t)])),
            "verdict_agreement": float(np.mean([(a[1] == good) == (b[1] == good) for a, b in zip(o, t)])),
            "max_score_diff": float(max(abs(a[0] - b[0]) for a, b in zip(o, t)))}


def parity_disagreement(p: dict) -> tuple[float, str]:
    """What the parity margin is held against: per image where the check had whole images
    (the line decides per image: a one-step rounding tie on one mirror view averages out),
    else per input. The worse of label and verdict disagreement."""
    if "images" in p:
        im = p["images"]
        return 1.0 - min(im["label_agreement"], im["verdict_agreement"]), f"{im['n']} images"
    return 1.0 - p["top1_agreement"], f"{p['n']} inputs"


def parity_summary(p: dict) -> str:
    head = ""
    if "images" in p:
        im = p["images"]
        head = (f"per image label {100 * im['label_agreement']:.2f}%, verdict "
                f"{100 * im['verdict_agreement']:.2f}% on {im['n']} images; ")
    return (f"{head}per input top-1 {100 * p['top1_agreement']:.2f}% on {p['n']} inputs, max "
            f"score difference {p['max_score_diff']:.4f}")


def _as_inputs(images, bundle: Bundle) -> np.ndarray:
    """Model inputs (N, H, W, C) uint8 from what a caller has: model inputs already, or a
    (N, tiles*views, H, W, C) stack as the trainer keeps them."""
    spec = bundle.input
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise OnnxExportError(f"representative images must be uint8 model inputs, got {x.dtype}")
    x = x.reshape((-1, spec.height, spec.width, spec.channels))
    if not len(x):
        raise OnnxExportError("no representative images")
    return x


def _float_source(bundle: Bundle, float_model, tmp: Path) -> tuple[Path, str]:
    if float_model is None:
        p = bundle.file(FLOAT_MODEL)
        if p is None:
            raise OnnxExportError(f"bundle {bundle.path} has no {FLOAT_MODEL} to convert (it was "
                                  "trained with --no-float): retrain without it, or have the "
                                  "trainer pass its Keras model")
        return p, FLOAT_MODEL
    if isinstance(float_model, (str, Path)):
        return Path(float_model), Path(float_model).name
    from .export import to_tflite

    spec = bundle.input
    path = tmp / "keras_float.tflite"
    path.write_bytes(to_tflite(float_model, (spec.height, spec.width, spec.channels)))
    return path, "the Keras model (float TFLite at batch 1)"


def add_onnx(bundle_dir, representative_uint8_images, *, parity_images=None,
             margin: float | None = None, float_model=None, int8_from: str = "auto",
             opset: int = OPSET, seed: int = 0) -> dict:
    """Write model_float.onnx and model.onnx (int8) into a bundle and list them in its
    bundle.json (metrics.onnx holds this report). `representative_uint8_images`: model inputs
    (N, H, W, C) uint8 from agent.preprocess, calibration for the int8 model; at most
    REPRESENTATIVE are used, plus a 0..255 ramp as the TFLite calibration has. `parity_images`
    (default: the representative ones) are the inputs the int8 ONNX is compared on with the
    int8 TFLite, image by image (tiles x views inputs each, as images_from_data gives them):
    beyond `margin` disagreement (default: the bundle's parity_margin, as the trainer's
    int8-vs-float check) on the images' verdicts or labels as agent.decide makes them (per
    input for the representative images, which are not whole images), nothing is written and
    OnnxExportError says why.
    `float_model`: a Keras model or a float .tflite path instead of the bundle's float TFLite.
    Returns the report."""
    _tools()
    import onnx

    if int8_from not in INT8_CHOICES:
        raise OnnxExportError(f"int8_from must be one of {', '.join(INT8_CHOICES)}")
    if opset < 13:
        raise OnnxExportError("opset must be >= 13 (per-channel QuantizeLinear)")
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise OnnxExportError(str(e)) from None
    if bundle.kind != "classifier":
        raise OnnxExportError(f"bundle {bundle.path} is an {bundle.kind} bundle: its features and "
                              "memory search run on the CPU engine; ONNX export is for classifiers")
    margin = float(bundle.metrics.get("parity_margin", 0.01) if margin is None else margin)
    t_start = time.perf_counter()
    reps = _as_inputs(representative_uint8_images, bundle)
    rng = np.random.default_rng(seed)
    reps = reps[rng.permutation(len(reps))[:REPRESENTATIVE]]
    spec = bundle.input
    cal = np.concatenate([_ramp(spec.height, spec.width, spec.channels)[None], reps])
    check = reps if parity_images is None else _as_inputs(parity_images, bundle)
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=bundle.path) as td:
        tmp = Path(td)
        src, src_name = _float_source(bundle, float_model, tmp)
        fpath = tmp / ONNX_FLOAT_MODEL
        save_model(tflite_to_onnx(src, opset), fpath)
        tried = {}
        for route in (INT8_ROUTES if int8_from == "auto" else (int8_from,)):
            qpath = tmp / f"{route}.onnx"
            if route == "qdq":
                how = quantize_qdq(fpath, qpath, cal)
                save_model(onnx.load(str(qpath)), qpath)
            else:
                save_model(tflite_to_onnx(bundle.model_path, opset), qpath)
                how = {"method": "tf2onnx from the int8 TFLite (its own asymmetric int8 scales; "
                                 "TensorRT runs these layers in float)"}
            tried[route] = {**how, "parity": parity(qpath, bundle.model_path, bundle, check,
                                                    per_image=parity_images is not None)}
            off, on = parity_disagreement(tried[route]["parity"])
            if off <= margin:
                break
            log.info("int8 route %s: %.2f%% disagreement on %s is beyond the margin", route,
                     100 * off, on)
        p_int8 = tried[route]["parity"]
        qmodel = onnx.load(str(qpath))
        opsets = {o.domain or "ai.onnx": o.version for o in qmodel.opset_import}
        disagree, on = parity_disagreement(p_int8)
        if disagree > margin:
            figs = "; ".join(f"{r}: {parity_summary(t['parity'])}" for r, t in tried.items())
            raise OnnxExportError(
                f"ONNX int8 parity check failed: against the int8 TFLite on {on} ({figs}), "
                f"beyond the allowed disagreement of {100 * margin:.2f}%; no ONNX added to "
                f"{bundle.path}")
        # the float ONNX against the float TFLite it came from: the conversion alone
        p_float = parity(fpath, src, bundle, check)
        report = {
            "opset": opsets.get("ai.onnx"),
            "float_from": src_name,
            "int8_from": route,
            "int8": {k: v for k, v in tried[route].items() if k != "parity"},
            "int8_routes_tried": {r: t["parity"] for r, t in tried.items()},
            "tensorrt_int8": route == "qdq",
            "tflite_sha256": bundle.model_sha256,
            "parity_on": "representative images" if parity_images is None else "parity images",
            "parity_margin": margin,
            "parity_judged_on": on,
            "parity": p_int8,
            "float_parity_vs_float_tflite": p_float,
            "float_bytes": fpath.stat().st_size,
            "int8_bytes": qpath.stat().st_size,
            "seconds": None,
            "versions": _versions(),
        }
        os.replace(qpath, tmp / ONNX_MODEL)
        qpath = tmp / ONNX_MODEL
        os.replace(fpath, bundle.path / ONNX_FLOAT_MODEL)
        os.replace(qpath, bundle.path / ONNX_MODEL)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    add_files(bundle.path, (ONNX_FLOAT_MODEL, ONNX_MODEL), metrics={"onnx": report})
    log.info("ONNX added to %s: int8 (%s) against the int8 TFLite: %s; float ONNX vs float "
             "TFLite %.2f%%  [%.0fs]", bundle.path, route, parity_summary(p_int8),
             100 * p_float["top1_agreement"], report["seconds"])
    return report


def _versions() -> dict:
    out = {}
    for mod in ("onnx", "onnxruntime", "tf2onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is provenance, never a failure
            out[mod] = None
    return out


def images_from_data(bundle: Bundle, data: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(calibration inputs from the training images, parity inputs from the test images or
    None, a description), all through agent.preprocess with the bundle's input spec: each
    image's tiles and their mirror views, as the agent gives them to the model."""
    from .data import load_split, scan_dataset

    train, test = scan_dataset(Path(data))
    rng = np.random.default_rng(seed)
    spec = bundle.input

    def inputs(split, role, limit):
        _, _, imgs, _ = load_split(split, role)
        idx = rng.permutation(len(imgs))[:limit]
        one = dataclasses.replace(spec, views=1)
        x = np.stack([preprocess(imgs[i], one) for i in idx])            # (N, tiles, H, W, C)
        return np.concatenate([add_views(t, spec.views) for t in x])

    cal = inputs(train, "calibration", n)
    par = inputs(test, "parity", 10 ** 9) if test is not None else None
    what = f"calibration: {len(cal)} inputs from {train.root}" + (
        f"; parity: {len(par)} inputs from {test.root}" if par is not None else
        "; parity on the calibration inputs (no test/ folder)")
    return cal, par, what


def main(argv: list[str]) -> int:
    prog = argv[0] if argv and not argv[0].endswith(".py") else "convert-bundle"
    p = argparse.ArgumentParser(prog=prog,
                                description="Add ONNX models (float, int8 QDQ) to an existing "
                                            "bundle, for ONNX Runtime and TensorRT.")
    p.add_argument("bundle", type=Path, help="bundle directory (changed in place; copy it first "
                                             "to keep the original)")
    p.add_argument("--data", type=Path, required=True,
                   help="the training folder (class folders, or a folder holding train/ and "
                        "test/): calibration images from train/, parity images from test/")
    p.add_argument("--representative", type=int, default=REPRESENTATIVE,
                   help=f"calibration images (default {REPRESENTATIVE})")
    p.add_argument("--int8-from", choices=INT8_CHOICES, default="auto",
                   help="qdq: ONNX Runtime's static QDQ quantizer (TensorRT int8); tflite: tf2onnx "
                        "from the int8 TFLite (its scales; TensorRT runs it in float); auto "
                        "(default): qdq if it passes the parity check, else tflite")
    p.add_argument("--parity-margin", type=float, default=None, metavar="PCT",
                   help="allowed top-1 disagreement with the int8 TFLite, in %% (default: the "
                        "bundle's parity margin)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    try:
        a = p.parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from .data import DataError

    try:
        _tools()
        bundle = load_bundle(a.bundle)
        cal, par, what = images_from_data(bundle, a.data, a.representative, a.seed)
        log.info("%s", what)
        rep = add_onnx(a.bundle, cal, parity_images=par, int8_from=a.int8_from, opset=a.opset,
                       margin=None if a.parity_margin is None else a.parity_margin / 100.0,
                       seed=a.seed)
    except (OnnxExportError, BundleError, DataError) as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    if a.json:
        import json
        print(json.dumps(rep))
    else:
        print(f"{ONNX_MODEL} (int8, {rep['int8_from']}) and {ONNX_FLOAT_MODEL} added to {a.bundle}: "
              f"against {INT8_MODEL}: {parity_summary(rep['parity'])}; opset {rep['opset']}")
    return 0


def cli() -> int:
    """The `convert-bundle` console script."""
    return main(["convert-bundle", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
