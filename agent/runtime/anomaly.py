"""Scoring an anomaly bundle on the box: the int8 feature model, then the memory of good patches.

The bundle's model.tflite maps pixels to Lite0 features at strides 8 and 16 (3x3 neighbourhood
averages, inside the graph); here they are upsampled to the stride-8 grid, concatenated per
patch, projected (PCA, fitted on good patches) and compared with memory.npz:
- patchcore: distance to the nearest good patch of a coreset bank (numpy matmul, exact);
- padim: Mahalanobis distance to the per-position Gaussian of good patches.
The patch map's max (after a small blur, so one noisy patch is not a part) is the raw score;
agent.decide turns it into the [0, 1] score every bundle kind is judged by.

Training (convert.anomaly) calls the same functions, so the bank and the calibration see
exactly the features the line sees. No TensorFlow here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import ANOMALY_MEMORY, sha256_file
from agent.decide import anomaly_probs
from .engines.base import Engine, EngineError
from .engines.litert import interpreter_module
from agent.preprocess import to_input_tensor

MEMORY_FILE = ANOMALY_MEMORY
METHODS = ("patchcore", "padim")
MEMORY_FORMAT = 1


class AnomalyMemoryError(Exception):
    """A memory file that must not be used (wrong hash, wrong feature model, bad content)."""


@dataclass(frozen=True)
class Memory:
    method: str
    mean: np.ndarray            # (D,) patch-feature mean of the good training patches
    proj: np.ndarray            # (D, d) PCA projection
    grid: tuple[int, int]       # (rows, cols) of the patch map (stride 8)
    scale: float                # raw score that decide.anomaly_probs maps to 0.5
    smooth: float               # Gaussian blur sigma (patches) on the map before its max
    model_sha256: str           # the feature model this memory was built from
    bank: np.ndarray | None = None        # patchcore: (M, d) coreset of good patches
    mu: np.ndarray | None = None          # padim: (P, d) per-position means
    inv_cov: np.ndarray | None = None     # padim: (P, d, d) per-position inverse covariances

    @property
    def dim(self) -> int:
        return int(self.proj.shape[0])

    def save(self, path: Path) -> None:
        arrays = {"format": np.array(MEMORY_FORMAT), "method": np.array(self.method),
                  "mean": self.mean.astype(np.float32), "proj": self.proj.astype(np.float32),
                  "grid": np.array(self.grid, np.int32), "scale": np.array(self.scale, np.float64),
                  "smooth": np.array(self.smooth, np.float64),
                  "model_sha256": np.array(self.model_sha256)}
        if self.method == "patchcore":
            arrays["bank"] = self.bank.astype(np.float32)
        else:
            arrays["mu"] = self.mu.astype(np.float32)
            # float16 halves the file; the distances it gives differ by < 0.1 % (measured)
            arrays["inv_cov"] = self.inv_cov.astype(np.float16)
        with open(path, "wb") as f:
            np.savez(f, **arrays)


def load_memory(path: Path, model_sha256: str | None = None) -> Memory:
    """Read memory.npz; with model_sha256, refuse a memory built from another feature model."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise AnomalyMemoryError(f"{path} is not a readable memory file: {e}") from None
    try:
        if int(d["format"]) != MEMORY_FORMAT:
            raise AnomalyMemoryError(f"{path}: memory format {int(d['format'])} is not supported "
                               f"(expects {MEMORY_FORMAT}); re-train the bundle")
        method = str(d["method"])
        if method not in METHODS:
            raise AnomalyMemoryError(f"{path}: unknown memory method {method!r}")
        m = Memory(method=method, mean=d["mean"].astype(np.float32),
                   proj=d["proj"].astype(np.float32), grid=tuple(int(v) for v in d["grid"]),
                   scale=float(d["scale"]), smooth=float(d["smooth"]),
                   model_sha256=str(d["model_sha256"]),
                   bank=d["bank"].astype(np.float32) if "bank" in d else None,
                   mu=d["mu"].astype(np.float32) if "mu" in d else None,
                   inv_cov=d["inv_cov"].astype(np.float32) if "inv_cov" in d else None)
    except KeyError as e:
        raise AnomalyMemoryError(f"{path}: memory file lacks {e.args[0]!r}; re-train the bundle") from None
    if model_sha256 is not None and m.model_sha256 != model_sha256:
        raise AnomalyMemoryError(f"{path} was built from feature model {m.model_sha256[:12]}…, not this "
                           f"bundle's model.tflite {model_sha256[:12]}…; re-train the bundle")
    d_in, d_out = m.proj.shape
    ok = m.mean.shape == (d_in,) and m.scale > 0 and (
        (method == "patchcore" and m.bank is not None and m.bank.ndim == 2 and m.bank.shape[1] == d_out)
        or (method == "padim" and m.mu is not None and m.inv_cov is not None
            and m.mu.shape == (m.grid[0] * m.grid[1], d_out)
            and m.inv_cov.shape == (m.grid[0] * m.grid[1], d_out, d_out)))
    if not ok:
        raise AnomalyMemoryError(f"{path}: inconsistent memory arrays; re-train the bundle")
    return m


def patch_features(outputs: list[np.ndarray]) -> np.ndarray:
    """Dequantized feature maps of ONE image, any order -> (rows*cols, D) patch features on the
    finest grid: coarser maps are upsampled (bilinear) and concatenated after the finest."""
    outputs = sorted(outputs, key=lambda a: -a.shape[0])
    rows, cols = outputs[0].shape[:2]
    parts = [outputs[0]]
    for f in outputs[1:]:
        # cv2.resize takes at most 512 channels: plenty for Lite0's 112
        parts.append(cv2.resize(f, (cols, rows), interpolation=cv2.INTER_LINEAR).reshape(rows, cols, -1))
    return np.concatenate(parts, axis=-1).reshape(rows * cols, -1)


class Scorer:
    """Patch features -> patch anomaly map -> raw image score, for one Memory."""

    def __init__(self, memory: Memory):
        self.m = memory
        # Fold the centring into the projection: x @ P - mean @ P, one matmul on the box.
        self._offset = (memory.mean @ memory.proj).astype(np.float32)
        if memory.method == "patchcore":
            self._bank_t = np.ascontiguousarray(memory.bank.T)
            self._bank_sq = (memory.bank ** 2).sum(axis=1).astype(np.float32)

    def patch_map(self, feats: np.ndarray) -> np.ndarray:
        """(P, D) -> (rows, cols) float32 anomaly map (a distance per patch)."""
        x = feats.astype(np.float32, copy=False) @ self.m.proj - self._offset
        if self.m.method == "patchcore":
            # |x - b|^2 = |x|^2 - 2 x.b + |b|^2: one (P, d) x (d, M) matmul, the min over M
            d2 = (x @ self._bank_t) * -2.0
            d2 += self._bank_sq
            dist = d2.min(axis=1) + (x * x).sum(axis=1)
        else:
            diff = x - self.m.mu
            dist = np.einsum("pi,pij,pj->p", diff, self.m.inv_cov, diff, optimize=True)
        return np.sqrt(np.maximum(dist, 0.0)).reshape(self.m.grid)

    def raw_score(self, pmap: np.ndarray) -> float:
        return blur_max(pmap, self.m.smooth)


def blur_max(pmap: np.ndarray, sigma: float) -> float:
    """The image's raw score: the max of the (blurred) patch map. The blur makes a defect a
    few patches wide outscore one noisy patch on a good part (AUROC 0.88 -> 0.955 with
    sigma 3 for PatchCore on magnetic tiles; benchmarks/README.md)."""
    if sigma > 0:
        pmap = cv2.GaussianBlur(pmap, (0, 0), sigma)
    return float(pmap.max())


class FeatureModel:
    """The int8 multi-output feature TFLite model through the LiteRT Interpreter."""

    def __init__(self, model_path: Path, spec, *, threads: int = 1):
        mod = interpreter_module()
        try:
            self.interp = mod.Interpreter(model_path=str(model_path), num_threads=threads)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"cannot load {model_path}: {e}") from None
        inp = self.interp.get_input_details()
        self._outs = self.interp.get_output_details()
        if len(inp) != 1 or len(self._outs) < 2:
            raise EngineError(f"{model_path}: an anomaly feature model has 1 input and 2+ "
                              f"outputs, got {len(inp)} and {len(self._outs)}")
        self._in = inp[0]
        shape = tuple(int(v) for v in self._in["shape"])
        want = (1, spec.height, spec.width, spec.channels)
        if shape != want:
            raise EngineError(f"{model_path}: model input {shape} does not match the bundle's "
                              f"input spec {want}")
        self.threads = threads

    def grid(self) -> tuple[int, int]:
        big = max(self._outs, key=lambda o: int(o["shape"][1]))
        return int(big["shape"][1]), int(big["shape"][2])

    def dim(self) -> int:
        return sum(int(o["shape"][-1]) for o in self._outs)

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        """uint8 (H, W, C) -> the dequantized float32 feature maps (h, w, c)."""
        x = to_input_tensor(pixels[None], self._in["dtype"], *self._in["quantization"])
        self.interp.set_tensor(self._in["index"], x)
        self.interp.invoke()
        out = []
        for o in self._outs:
            y = self.interp.get_tensor(o["index"])[0]
            if y.dtype != np.float32:
                scale, zp = o["quantization"]
                y = (y.astype(np.float32) - zp) * scale
            out.append(y)
        return out


class AnomalyEngine(Engine):
    """The Engine of an anomaly bundle: pixels (N, H, W, C) -> (N, 2) [P(good), score], so the
    Inspector, agent.decide and evaluate judge it exactly like a classifier."""

    name = "anomaly"

    def __init__(self, model_path: Path, memory_path: Path, spec, *, threads: int = 1,
                 model_sha256: str | None = None):
        self.features = FeatureModel(model_path, spec, threads=threads)
        try:
            self.memory = load_memory(memory_path, model_sha256 or sha256_file(model_path))
        except AnomalyMemoryError as e:
            raise EngineError(str(e)) from None
        if tuple(self.memory.grid) != self.features.grid() or self.memory.dim != self.features.dim():
            raise EngineError(f"{memory_path}: memory for a {self.memory.grid} x {self.memory.dim} "
                              f"patch grid does not fit the feature model's "
                              f"{self.features.grid()} x {self.features.dim()}; re-train the bundle")
        self.scorer = Scorer(self.memory)

    @classmethod
    def from_bundle(cls, bundle, threads: int = 1) -> "AnomalyEngine":
        mem = bundle.file(MEMORY_FILE)
        if mem is None:
            raise EngineError(f"bundle {bundle.path}: an anomaly bundle must list {MEMORY_FILE}")
        return cls(bundle.model_path, mem, bundle.input, threads=threads,
                   model_sha256=bundle.model_sha256)

    def maps(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The patch anomaly map of every input (a person can see where)."""
        return [self.scorer.patch_map(patch_features(self.features(p))) for p in pixels]

    def raw_scores(self, pixels: np.ndarray) -> np.ndarray:
        return np.array([self.scorer.raw_score(m) for m in self.maps(pixels)], np.float64)

    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        return anomaly_probs(self.raw_scores(pixels), self.memory.scale)

    def describe(self) -> str:
        return f"anomaly {self.memory.method} on cpu (threads={self.features.threads})"
