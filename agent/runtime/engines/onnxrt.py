"""ONNX Runtime: TensorRT and CUDA on an NVIDIA GPU (a Jetson), or its own CPU provider.

The bundle's `model.onnx` (int8 QDQ, convert.onnx_export) is run with the providers of the
configured delegate and those below it, in this order: tensorrt -> cuda -> onnx-cpu, so ONNX
Runtime can place an op TensorRT refuses on CUDA, and one CUDA lacks on the CPU. The
delegate's own provider must be there: a box that was meant to run TensorRT and silently runs
the CPU would miss the line rate without saying why, so a missing one is an EngineError with
one line of reason (and `[model] cpu_fallback = true` then runs model.tflite on LiteRT).

The input contract is the TFLite engine's: raw uint8 pixels (N, H, W, C) from
agent.preprocess (every view of every tile), probabilities (N, labels) back.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from agent.preprocess import InputSpec
from agent.runtime.engines.base import Engine, EngineError, register

log = logging.getLogger("engine")

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "onnx-cpu": "CPUExecutionProvider"}
CHAIN = ("tensorrt", "cuda", "onnx-cpu")

_JETSON = ("on a Jetson: NVIDIA's onnxruntime-gpu wheel for your JetPack (docs/deploy.md); "
           "elsewhere: pip install onnxruntime-gpu")
# Device nodes of the NVIDIA driver: a desktop/server GPU, and a Jetson's integrated one.
_GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")
# sonames tried in order; a pip-installed TensorRT is found by ONNX Runtime itself, so a miss
# here is only a hint, confirmed by the session (see _session)
_LIBS = {"tensorrt": ("libnvinfer.so.10", "libnvinfer.so.8"),
         "cuda": ("libcudart.so.12", "libcudart.so.11.0")}
KEEP_CACHES = 2     # the current model's TensorRT engines and the previous one's (a rollback)


def ort_module():
    try:
        import onnxruntime
        return onnxruntime
    except ImportError:
        raise EngineError("onnxruntime is not installed: pip install 'edge-inspect[onnx]' "
                          f"(CPU); {_JETSON}") from None


def _gpu_present() -> bool:
    return any(os.path.exists(p) for p in _GPU_NODES)


def _lib_missing(delegate: str) -> str | None:
    names = _LIBS.get(delegate, ())
    for name in names:
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return ", ".join(names) if names else None


def provider_reason(delegate: str) -> str | None:
    """None when `delegate`'s provider can run here, else one line saying why not."""
    try:
        ort = ort_module()
    except EngineError as e:
        return str(e)
    prov = PROVIDERS[delegate]
    have = ort.get_available_providers()
    if prov not in have:
        return (f"this onnxruntime {ort.__version__} wheel has no {prov} (it has "
                f"{', '.join(p.removesuffix('ExecutionProvider') for p in have)}): wrong wheel; "
                f"{_JETSON}")
    if delegate == "onnx-cpu":
        return None
    if not _gpu_present():
        return (f"no NVIDIA GPU: none of {', '.join(_GPU_NODES)} exists (driver not loaded, or the "
                "service's DeviceAllow= hides it: docs/deploy.md)")
    return None


def cache_root() -> Path:
    """Where TensorRT keeps its built engines: the agent's state directory (systemd's
    StateDirectory=, /var/lib/edge-inspect), or EDGE_INSPECT_TRT_CACHE."""
    if os.environ.get("EDGE_INSPECT_TRT_CACHE"):
        return Path(os.environ["EDGE_INSPECT_TRT_CACHE"])
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "trt-cache"
    default = Path("/var/lib/edge-inspect")
    if default.is_dir() and os.access(default, os.W_OK):
        return default / "trt-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-inspect" / "trt-cache"


def model_cache_dir(root: Path, model_sha256: str) -> Path:
    """The cache directory of one model: named by its sha256, so a new model (another hash)
    gets a new, empty one and TensorRT builds afresh; older ones beyond KEEP_CACHES go."""
    d = root / model_sha256[:16]
    d.mkdir(parents=True, exist_ok=True)
    os.utime(d)
    others = sorted((p for p in root.iterdir() if p.is_dir() and p != d),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[KEEP_CACHES - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return d


def resolve_model(model_path: Path) -> tuple[Path, str]:
    """(the .onnx to run, its sha256). Given a bundle's model.tflite (what the Inspector
    passes every engine), its bundle's listed model.onnx, checked against bundle.json and
    against the model.tflite it was exported from."""
    from agent.bundle import INT8_MODEL, MANIFEST, ONNX_MODEL, sha256_file

    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        if not model_path.is_file():
            raise EngineError(f"{model_path} does not exist")
        return model_path, sha256_file(model_path)
    bdir = model_path.parent
    try:
        m = json.loads((bdir / MANIFEST).read_bytes())
        files = m["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EngineError(f"{model_path}: not a bundle's model (no readable {bdir / MANIFEST}); "
                          "the ONNX engines run a bundle's model.onnx") from None
    how = (f"add it on the workstation: edge-inspect convert-bundle {bdir} --data TRAINING_FOLDER "
           "(pip install 'edge-inspect[onnx-export]'), then deploy the bundle again")
    if ONNX_MODEL not in files:
        raise EngineError(f"bundle {bdir} carries no {ONNX_MODEL}; {how}")
    onnx_path = bdir / ONNX_MODEL
    if not onnx_path.is_file():
        raise EngineError(f"bundle {bdir}: {ONNX_MODEL} is listed in {MANIFEST} but missing; "
                          "re-copy the bundle")
    actual = sha256_file(onnx_path)
    want = str(files[ONNX_MODEL].get("sha256"))
    if actual != want:
        raise EngineError(f"bundle {bdir}: {ONNX_MODEL} is corrupt or was changed after export "
                          f"(sha256 {actual[:12]}… != {want[:12]}… in {MANIFEST}); re-copy or "
                          "re-export the bundle")
    made_from = ((m.get("metrics") or {}).get("onnx") or {}).get("tflite_sha256")
    tfl = (files.get(INT8_MODEL) or {}).get("sha256")
    if made_from != tfl:
        raise EngineError(f"bundle {bdir}: {ONNX_MODEL} was exported from another {INT8_MODEL} "
                          f"(sha256 {str(made_from)[:12]}…, the bundle's is {str(tfl)[:12]}…): "
                          f"its parity was never checked against this model; {how}")
    return onnx_path, actual


def _device_id(device: str | None) -> int:
    """'0', ':0', 'cuda:0' -> 0 (the config's device setting, or none: the first GPU)."""
    if not device:
        return 0
    tail = device.rsplit(":", 1)[-1]
    if not tail.isdigit():
        raise EngineError(f"GPU device {device!r}: expected a number such as '0' or ':0'")
    return int(tail)


SHARED_CONSTANTS = "Attempt to replace the existing tensor"


def session_options(ort, threads: int, exact: bool = True):
    """The engine's ORT session options. exact: on x86-64 without VNNI (AVX2, e.g. this
    project's AMD EPYC dev box and most fanless Celeron/Atom line PCs) ORT's fast int8 kernels
    multiply u8 x s8 pairs with VPMADDUBSW, whose 16-bit sums saturate: a QDQ model's top-1
    agreed with its own float simulation on 60 % of DeepPCB inputs there, 100 % in the exact
    mode (benchmarks/README.md, ONNX, 2026-12-07). VNNI and ARM CPUs ignore the setting."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3      # ORT's own provider-fallback warning is said better below
    if exact:
        so.add_session_config_entry("session.x64quantprecision", "1")
    return so


class OnnxRuntimeEngine(Engine):
    """One ONNX Runtime session; subclasses say which provider leads."""

    name = "onnx"
    delegate = "onnx-cpu"
    exact_int8 = True

    @classmethod
    def available(cls):
        return provider_reason(cls.delegate)

    def __init__(self, model_path: Path, spec: InputSpec, n_labels: int, *, threads: int = 2,
                 device: str | None = None, cache_dir: Path | None = None):
        ort = ort_module()
        self.path, self.sha256 = resolve_model(Path(model_path))
        self.threads = threads
        self.device_id = _device_id(device)
        self.cache_dir = None
        if self.delegate == "tensorrt":
            self.cache_dir = model_cache_dir(Path(cache_dir) if cache_dir else cache_root(),
                                             self.sha256)
        self.session = self._session(ort, threads)
        inp, out = self.session.get_inputs(), self.session.get_outputs()
        if len(inp) != 1 or len(out) != 1:
            raise EngineError(f"{self.path}: expected 1 input and 1 output, got {len(inp)} and {len(out)}")
        self._in = inp[0]
        shape = list(self._in.shape)
        want = [spec.height, spec.width, spec.channels]
        if len(shape) != 4 or shape[1:] != want:
            raise EngineError(f"{self.path}: model input {tuple(shape)} does not match the "
                              f"bundle's input spec (N, {want[0]}, {want[1]}, {want[2]})")
        if out[0].shape[-1] != n_labels:
            raise EngineError(f"{self.path}: model has {out[0].shape[-1]} outputs but the bundle "
                              f"lists {n_labels} labels")
        # a static batch (TFLite-derived models have 1) is fed in chunks as LiteRT is
        self.batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self._dtype = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}.get(self._in.type)
        if self._dtype is None:
            raise EngineError(f"{self.path}: input type {self._in.type} (expected uint8 or float)")
        self._out_name = out[0].name

    def _provider_list(self) -> list:
        # No optimisation profile: our models have a fixed (1, H, W, C) input (see
        # convert.onnx_export), so TensorRT builds one engine for one shape, cached.
        trt = {"device_id": self.device_id,
               "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(self.cache_dir) if self.cache_dir else "",
               "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(self.cache_dir) if self.cache_dir else "",
               # explicit QDQ: TensorRT takes the int8 scales from the graph; fp16 for the rest
               "trt_int8_enable": True, "trt_fp16_enable": True}
        cuda = {"device_id": self.device_id}
        chain = {"tensorrt": [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda)],
                 "cuda": [("CUDAExecutionProvider", cuda)], "onnx-cpu": []}[self.delegate]
        return chain + ["CPUExecutionProvider"]

    def _session(self, ort, threads: int):
        try:
            sess = ort.InferenceSession(str(self.path), session_options(ort, threads),
                                        providers=self._provider_list())
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            if SHARED_CONSTANTS not in str(e):
                raise EngineError(f"cannot load {self.path} on {self.delegate}: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            # an ONNX exported before 2026-12-07: it runs, but not in the exact int8 mode
            log.warning("%s shares int8 constants between nodes, which onnxruntime's exact int8 "
                        "mode cannot load: running it on the fast int8 kernels, which saturate "
                        "on x86-64 CPUs without VNNI and can flip verdicts there. Re-export it: "
                        "edge-inspect convert-bundle BUNDLE --data DATA", self.path)
            self.exact_int8 = False
            sess = ort.InferenceSession(str(self.path), session_options(ort, threads, exact=False),
                                        providers=self._provider_list())
        want = PROVIDERS[self.delegate]
        got = sess.get_providers()
        if want not in got:
            lib = _lib_missing(self.delegate)
            hint = f"{lib} could not be loaded" if lib else "its libraries failed to load"
            raise EngineError(f"onnxruntime could not start {want} ({hint}; running would fall "
                              f"back to {', '.join(got)}): install the CUDA/TensorRT that this "
                              f"onnxruntime-gpu wheel was built for ({_JETSON})")
        return sess

    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels if self._dtype == np.uint8 else pixels.astype(np.float32)
        if self.batch is None:
            return np.asarray(self.session.run([self._out_name], {self._in.name: x})[0], np.float32)
        n = x.shape[0]
        results = []
        for i in range(0, n, self.batch):
            chunk = x[i:i + self.batch]
            if chunk.shape[0] != self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - chunk.shape[0], 0)])
            y = self.session.run([self._out_name], {self._in.name: chunk})[0]
            results.append(y[: min(self.batch, n - i)])
        y = np.concatenate(results) if len(results) > 1 else results[0]
        return np.asarray(y, np.float32)

    def describe(self) -> str:
        provs = "+".join(p.removesuffix("ExecutionProvider") for p in self.session.get_providers())
        extra = f", engine cache {self.cache_dir}" if self.cache_dir else ""
        extra += "" if self.exact_int8 else ", fast int8 kernels (re-export: see the log)"
        return f"{self.name} (onnxruntime {provs}, threads={self.threads}{extra})"


@register
class TensorRtEngine(OnnxRuntimeEngine):
    name = "tensorrt"
    delegate = "tensorrt"


@register
class CudaEngine(OnnxRuntimeEngine):
    name = "cuda"
    delegate = "cuda"


@register
class OnnxCpuEngine(OnnxRuntimeEngine):
    name = "onnx-cpu"
    delegate = "onnx-cpu"
