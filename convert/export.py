"""Keras -> TFLite (float and full-integer int8), op listing, Edge TPU report and compile."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("convert.export")

# Operations the Edge TPU compiler can map, from Coral's published table "Supported
# operations" (https://coral.ai/docs/edgetpu/models-intro/#supported-operations), spelled as
# TFLite builtin op names. Each is mappable only when quantized to 8 bits with static shapes;
# the table's per-op limits (e.g. ReduceMax not over the batch) are noted where they matter.
EDGETPU_SUPPORTED_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE",
    "TRANSPOSE_CONV",
})

_EDGETPU_INSTALL = ("edgetpu_compiler is not on PATH: it runs on x86-64 Debian/Ubuntu only; "
                    "install it from Coral's apt repository (see "
                    "https://coral.ai/docs/edgetpu/compiler/#system-requirements): "
                    "curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - ; "
                    "echo 'deb https://packages.cloud.google.com/apt coral-edgetpu-stable main' | "
                    "sudo tee /etc/apt/sources.list.d/coral-edgetpu.list ; "
                    "sudo apt-get update && sudo apt-get install edgetpu-compiler")


class ExportError(Exception):
    pass


def to_tflite(model, shape: tuple[int, int, int], representative=None,
              calibrate_only: bool = False) -> bytes:
    """Convert with a FIXED [1, H, W, C] signature (batch 1, static shapes).

    With `representative` (an iterable of float32 (1,H,W,C) raw-pixel arrays): full-integer
    int8 ops with uint8 input and output. Without: a float32 model. calibrate_only: the float
    model with the calibrated min/max of every tensor, before quantization (for studies of
    the ranges, benchmarks/int8_noise.py).
    """
    import tensorflow as tf

    h, w, c = shape

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, c], tf.float32, name="pixels")])
    def serve(x):
        return model(x, training=False)

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Freeze the variables into the graph: Keras 3 variables are not tracked by the converter.
    cf = convert_variables_to_constants_v2(serve.get_concrete_function())
    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf])
    if representative is not None:
        reps = list(representative)

        def gen():
            for r in reps:
                yield [np.asarray(r, dtype=np.float32).reshape(1, h, w, c)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
        conv._experimental_calibrate_only = calibrate_only
    return conv.convert()


def representative_images(x: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Up to n preprocessed training samples (uint8 (H,W,C)), plus one 0..255 ramp so the
    calibrated input range is exactly 0..255 (uint8 input scale 1, zero point 0)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))[:n]
    h, w, c = x.shape[1:]
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float32)[None, :, None], (h, 1, c))
    return [ramp] + [x[i].astype(np.float32) for i in idx]


def model_ops(path: Path) -> Counter:
    """Builtin op names in a .tflite, counted (read through the LiteRT interpreter)."""
    from agent.runtime.engines.litert import interpreter_module

    interp = interpreter_module().Interpreter(model_path=str(path))
    return Counter(op["op_name"] for op in interp._get_ops_details())


def edgetpu_report(path: Path) -> dict:
    ops = model_ops(path)
    unsupported = sorted(o for o in ops if o not in EDGETPU_SUPPORTED_OPS)
    return {
        "ops": dict(sorted(ops.items())),
        "supported": sorted(o for o in ops if o in EDGETPU_SUPPORTED_OPS),
        "unsupported": unsupported,
        "all_supported": not unsupported,
        "source": "https://coral.ai/docs/edgetpu/models-intro/#supported-operations",
    }


def format_edgetpu_report(rep: dict) -> str:
    lines = ["Edge TPU op report (static, from Coral's supported-operations table):"]
    for op, n in rep["ops"].items():
        ok = "Edge TPU" if op not in rep["unsupported"] else "CPU only (not in Coral's table)"
        lines.append(f"  {op:<24} x{n:<3} {ok}")
    lines.append("  => every op is Edge TPU mappable" if rep["all_supported"] else
                 f"  => {len(rep['unsupported'])} op type(s) would run on the CPU: "
                 + ", ".join(rep["unsupported"]))
    return "\n".join(lines)


def compile_edgetpu(model_path: Path, out_dir: Path) -> Path:
    """Run edgetpu_compiler; returns the path of model_edgetpu.tflite. Raises ExportError."""
    exe = shutil.which("edgetpu_compiler")
    if not exe:
        raise ExportError(_EDGETPU_INSTALL)
    tmp = out_dir / ".edgetpu_tmp"
    tmp.mkdir(exist_ok=True)
    try:
        r = subprocess.run([exe, "-s", "-o", str(tmp), str(model_path)], capture_output=True,
                           text=True, timeout=600)
        log.info("%s", r.stdout.strip())
        if r.returncode != 0:
            raise ExportError(f"edgetpu_compiler failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        produced = tmp / (model_path.stem + "_edgetpu.tflite")
        if not produced.exists():
            raise ExportError(f"edgetpu_compiler produced no {produced.name}")
        dest = out_dir / "model_edgetpu.tflite"
        os.replace(produced, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
