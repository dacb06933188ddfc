"""Where the int8 ONNX (tflite route) and the int8 TFLite part: their logits tensor, in its own
int8 steps, on every parity input, and the TFLite's own top-2 gap where top-1 flips.

    python benchmarks/onnx_rounding.py BUNDLE DATA_DIR

DATA_DIR holds test/ (the parity images convert-bundle uses). Needs the onnx-export extra and
TensorFlow (for the TFLite interpreter's intermediate tensors). Figures: benchmarks/README.md,
"ONNX".
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import load_bundle  # noqa: E402
from agent.runtime.engines.onnxrt import session_options  # noqa: E402
from convert.onnx_export import save_model, images_from_data, tflite_to_onnx  # noqa: E402


def main() -> int:
    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    b = load_bundle(sys.argv[1])
    _, par, _ = images_from_data(b, Path(sys.argv[2]), 8, 0)
    it = tf.lite.Interpreter(model_path=str(b.model_path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    det = {d["name"]: d for d in it.get_tensor_details()}
    name = next(n for n in det if n.endswith("logits_1/BiasAdd") or n.endswith("/logits/Add"))
    scale = det[name]["quantization"][0]
    m = tflite_to_onnx(b.model_path)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory() as td:
        save_model(m, Path(td) / "m.onnx")
        s = ort.InferenceSession(f"{td}/m.onnx", session_options(ort, 2),
                                 providers=["CPUExecutionProvider"])
    outs = [o.name for o in s.get_outputs()]
    steps, gaps = [], []
    for x in par:
        it.set_tensor(it.get_input_details()[0]["index"], x[None])
        it.invoke()
        lt = it.get_tensor(det[name]["index"]).astype(int).ravel()
        lo = dict(zip(outs, s.run(None, {s.get_inputs()[0].name: x[None]})))[name].astype(int).ravel()
        steps.append(np.abs(lo - lt).max())
        if lo.argmax() != lt.argmax():
            top = np.sort(lt)
            gaps.append(int(top[-1] - top[-2]))
    steps = np.array(steps)
    print(f"{name}: int8 scale {scale:.4f} logits a step; |ONNX - TFLite| in steps on {len(steps)} "
          f"inputs: 0: {(steps == 0).sum()}, 1: {(steps == 1).sum()}, 2: {(steps == 2).sum()}, "
          f">2: {(steps > 2).sum()}")
    print(f"top-1 flips: {len(gaps)}; the TFLite's own top-2 gap there, in steps: "
          f"{ {g: gaps.count(g) for g in sorted(set(gaps))} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
