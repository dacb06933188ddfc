"""Where a Lite0 bundle's int8 model departs from its float model, and whether percentile
calibration of the activation ranges narrows the gap (research; `evaluate --float` gives the
product figure).

    python benchmarks/int8_noise.py where BUNDLE DATA_DIR/test [--every 2]
    python benchmarks/int8_noise.py ranges KERAS BUNDLE DATA_DIR/train DATA_DIR/test [--pct 99.9,99.99]

`where`: per test image (every Nth), the int8 and the float TFLite model of the bundle run
side by side on the reference kernels with every tensor kept; the defect score is computed
four ways: float, int8, the int8 model's pooled features through the float head, and the float
features rounded to the int8 feature grid through the float head. If the third matches int8
and the fourth matches float, the noise is in the backbone, not the head. Then the relative
RMS error (int8 - float) / sd(float) of each feature map, first to last.

`ranges`: a Keras model saved by `train --save-keras` (the bundle gives its input, threshold and
centring) is converted three ways, with the converter's min/max calibration and with each
activation range of the linear feature maps (the linear bottlenecks and residual sums, whose
ranges are not fixed by ReLU6) clipped to the given percentiles of 48 training images'
values; each int8 model is scored on the test set against the float one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import FLOAT_MODEL, load_bundle  # noqa: E402
from agent.preprocess import preprocess  # noqa: E402
from convert.data import load_split, scan_eval  # noqa: E402
from convert.threshold import roc_auc  # noqa: E402


def _images(data: Path, good: str, every: int = 1):
    """[(image, is_defect)] of a class-folder directory, every Nth (convert.data's reader)."""
    _, classes, images, _ = load_split(scan_eval(data), "study")
    return [(im, c != good) for im, c in zip(images, classes)][::every]


def _reference(content=None, path=None):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=None if path is None else str(path), model_content=content,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    return it


def _run(it, x):
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], x[None].astype(d["dtype"]))
    it.invoke()


def _dequantized(it, t):
    x = it.get_tensor(t["index"]).astype(np.float32)
    s, z = t["quantization"]
    return (x - z) * s if s else x


def _line(name, s, ref, truth, t):
    print(f"  {name:28s} AUC {roc_auc(s, truth):.4f}  same verdict as float {np.mean((s >= t) == (ref >= t)):.3f}"
          f"  mean |score - float| {np.mean(np.abs(s - ref)):.4f}")


def where(args) -> None:
    b = load_bundle(args.bundle)
    i8, fl = _reference(path=b.model_path), _reference(path=b.file(FLOAT_MODEL))
    d8 = {t["name"]: t for t in i8.get_tensor_details()}
    df = {t["name"]: t for t in fl.get_tensor_details()}

    def tensor(d, suffix, ndim):
        return next(t for n, t in d.items() if n.endswith(suffix) and len(t["shape"]) == ndim)

    pooled = ("max_cell_1/Max", "mean_cell_1/Mean")
    W = fl.get_tensor(tensor(df, "probs_1/MatMul", 2)["index"])
    Wm = fl.get_tensor(tensor(df, "logits_mean_1/MatMul", 2)["index"])
    bias = fl.get_tensor(tensor(df, "probs_1/BiasAdd", 1)["index"])
    maps = sorted((n for n in d8 if n in df and len(d8[n]["shape"]) == 4 and d8[n]["quantization"][0]
                   and list(d8[n]["shape"]) == list(df[n]["shape"])), key=lambda n: d8[n]["index"])
    good = b.labels.index(b.good_label)
    step = 6.0 / 255.0                      # the ReLU6 feature grid of the int8 model

    def soft(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    rows = {k: [] for k in ("float", "int8", "int8 features, float head", "float features on int8 grid")}
    err = {n: [] for n in maps}
    truth = []
    for im, y in _images(args.data, b.good_label, args.every):
        truth.append(y)
        per = {k: [] for k in rows}
        for v in preprocess(im, b.input):
            _run(i8, v)
            _run(fl, v)
            per["float"].append(fl.get_tensor(fl.get_output_details()[0]["index"])[0])
            per["int8"].append(_dequantized(i8, i8.get_output_details()[0])[0])
            gx, ga = (_dequantized(i8, tensor(d8, k, 2))[0] for k in pooled)
            fx, fa = (fl.get_tensor(tensor(df, k, 2)["index"])[0] for k in pooled)
            per["int8 features, float head"].append(soft(W @ gx + Wm @ ga + bias))
            per["float features on int8 grid"].append(
                soft(W @ (np.round(fx / step) * step) + Wm @ (np.round(fa / step) * step) + bias))
            if len(err[maps[0]]) < 24:
                for n in maps:
                    a, r = _dequantized(i8, d8[n]), fl.get_tensor(df[n]["index"])
                    err[n].append(np.sqrt(np.mean((a - r) ** 2)) / (np.std(r) + 1e-9))
        for k in rows:
            rows[k].append(1.0 - np.mean(per[k], axis=0)[good])
    truth = np.array(truth)
    ref = np.array(rows["float"])
    print(f"{b.path}: {len(truth)} images, threshold {b.threshold:.4f}")
    for k, s in rows.items():
        _line(k, np.array(s), ref, truth, b.threshold)
    print("relative RMS error of the int8 feature maps (int8 - float) / sd(float), first to last:")
    for n in maps:
        print(f"  {np.mean(err[n]):.3f}  scale {d8[n]['quantization'][0]:.4f}  {n.split(';')[0][:80]}")


def ranges(args) -> None:
    import keras
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    import convert.model  # noqa: F401 - registers Standardise for load_model
    from convert.export import representative_images, to_tflite
    from convert.model import centre_head

    b = load_bundle(args.bundle)
    model = keras.models.load_model(str(args.keras), compile=False)
    centre_head(model, b.metrics["threshold_selection"]["float_threshold_before_centring"])
    hwc = (b.input.height, b.input.width, b.input.channels)
    train = np.stack([preprocess(im, b.input)[0] for im, _ in _images(args.train, b.good_label)])
    reps = representative_images(train, 200, 1)
    calibrated = to_tflite(model, hwc, reps, calibrate_only=True)
    m = fbu.convert_bytearray_to_object(bytearray(calibrated))
    sub = m.subgraphs[0]
    linear = [i for i, t in enumerate(sub.tensors) if t.quantization is not None and t.quantization.min is not None
              and len(t.shape) == 4 and i not in set(sub.inputs)
              and not (t.quantization.min[0] >= -1e-6 and t.quantization.max[0] <= 6.0 + 1e-3)]
    it = _reference(content=calibrated)
    rng = np.random.default_rng(0)
    values = {i: [] for i in linear}
    for r in reps[1:49]:
        _run(it, r)
        for i in linear:
            v = it.get_tensor(i).ravel()
            values[i].append(v[rng.integers(0, v.size, min(v.size, 20000))])
    values = {i: np.concatenate(v) for i, v in values.items()}

    def clipped(p):
        mm = fbu.convert_bytearray_to_object(bytearray(calibrated))
        for i in linear:
            q = mm.subgraphs[0].tensors[i].quantization
            lo, hi = np.percentile(values[i], [100 - p, p])
            q.min = np.array([max(q.min[0], min(lo, 0.0))], np.float32)
            q.max = np.array([min(q.max[0], max(hi, 0.0))], np.float32)
        return tfl_convert.mlir_quantize(bytes(fbu.convert_object_to_bytearray(mm)),
                                         input_data_type=tf.uint8, output_data_type=tf.uint8)

    test = _images(args.test, b.good_label)
    truth = np.array([y for _, y in test])

    def scores(content):
        """The test set's defect scores of a converted model, through the agent's engine and
        decision rule (convert.evaluate.run_engine), as evaluate scores a bundle."""
        import tempfile

        from agent.runtime.engines import create_engine
        from convert.evaluate import run_engine

        with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
            f.write(content)
            f.flush()
            engine = create_engine("cpu", Path(f.name), b.input, len(b.labels), threads=2)
            return np.array(run_engine(engine, b, [im for im, _ in test])[0])

    ref = scores(to_tflite(model, hwc))
    print(f"{args.keras} (centred as {b.path}), {len(truth)} test images, {len(linear)} linear feature maps")
    _line("float", ref, ref, truth, b.threshold)
    _line("int8, min/max (the trainer's)", scores(to_tflite(model, hwc, reps)), ref, truth, b.threshold)
    for p in args.pct:
        _line(f"int8, ranges at p{p:g}", scores(clipped(p)), ref, truth, b.threshold)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sp = p.add_subparsers(dest="cmd", required=True)
    w = sp.add_parser("where")
    w.add_argument("bundle", type=Path)
    w.add_argument("data", type=Path)
    w.add_argument("--every", type=int, default=1)
    r = sp.add_parser("ranges")
    r.add_argument("keras", type=Path)
    r.add_argument("bundle", type=Path)
    r.add_argument("train", type=Path)
    r.add_argument("test", type=Path)
    r.add_argument("--pct", type=lambda s: [float(x) for x in s.split(",")], default=[99.9, 99.99, 99.999])
    args = p.parse_args()
    (where if args.cmd == "where" else ranges)(args)


if __name__ == "__main__":
    main()
