"""One model, ready to run: a verified bundle, its engine and the decision rule.

An Inspector is immutable once built; the pipeline swaps the whole object (reload, new
threshold), so a part is always judged by one consistent model + threshold.

    insp = Inspector.load("bundle/", threads=2)            # verifies hashes, smoke-tests
    pixels = insp.preprocess(image)                         # agent.preprocess, the one spec
    verdict, score, label = insp.decide(insp.infer(pixels))
    verdict, score, label = insp.inspect(image)             # the three at once (naive loop)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from firmware_io.commands import is_threshold

from agent.bundle import Bundle, BundleError, load_bundle
from agent.decide import decide
from agent.runtime.engines import Engine, EngineError, EnginePool, create_engine
from agent.preprocess import preprocess
from agent.types import Verdict

log = logging.getLogger("agent.runtime.inspector")


class InspectorError(Exception):
    """A model that must not go on the line; the message says why."""


def _class_maps(bundle: Bundle):
    """The maps() of a classifier bundle's map model, or None when it has none. A map model
    that will not load costs the pictures, not the line: the verdicts do not use it."""
    from agent.bundle import MAP_MODEL
    if MAP_MODEL not in bundle.files:
        return None
    from agent.runtime.class_map import MapModel
    try:
        return MapModel(bundle.path / MAP_MODEL, bundle.input).maps
    except EngineError as e:
        log.warning("no defect maps for rejects: %s", e)
        return None


class Inspector:
    def __init__(self, bundle: Bundle, engine: Engine, *, threshold: float | None = None,
                 delegate: str = "cpu"):
        self.bundle = bundle
        self.engine = engine
        self.spec = bundle.input
        self.threshold = float(bundle.threshold if threshold is None else threshold)
        if not is_threshold(self.threshold):
            raise InspectorError(f"threshold {self.threshold} is outside [0, 1]")
        self.threshold_source = "bundle" if threshold is None else "override"
        self.model_sha256 = bundle.model_sha256
        self.good_label = bundle.good_label
        self.delegate = delegate
        self._good = bundle.labels.index(bundle.good_label)
        # engines with maps(pixels) (anomaly bundles), or a classifier bundle's map model,
        # can say WHERE a part is defective
        self._maps = engine.maps if callable(getattr(engine, "maps", None)) else _class_maps(bundle)
        self.can_map = self._maps is not None

    # -- building ------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_path: str | Path, *, delegate: str = "cpu", threads: int = 2,
             device: str | None = None, cpu_fallback: bool = False,
             threshold: float | None = None, views: int | None = None,
             wrap: Callable[[Engine], Engine] | None = None,
             smoke_test: bool = True, workers: int = 1) -> "Inspector":
        """Load and verify a bundle, build its engine and check it runs. Raises
        InspectorError with one clear line (hash mismatch, unloadable model, ...)."""
        try:
            # Resolve models/current once: a deploy that swaps the link mid-load must not
            # give us half of one bundle and half of the other.
            bundle = load_bundle(Path(bundle_path).resolve()).with_views(views)
        except BundleError as e:
            raise InspectorError(str(e)) from None
        model = bundle.model_path
        if delegate == "edgetpu" and bundle.file("model_edgetpu.tflite") is not None:
            model = bundle.file("model_edgetpu.tflite")
        try:
            if bundle.kind == "anomaly":
                # Features + memory search, on the CPU (the search is numpy, not a delegate op)
                from agent.runtime.anomaly import AnomalyEngine
                engines = [AnomalyEngine.from_bundle(bundle, threads=threads)
                           for _ in range(max(1, workers))]
            else:
                engines = [create_engine(delegate, model, bundle.input, len(bundle.labels),
                                         threads=threads, device=device, cpu_fallback=cpu_fallback,
                                         cpu_model_path=bundle.model_path)
                           for _ in range(max(1, workers))]
        except EngineError as e:
            raise InspectorError(str(e)) from None
        engine = engines[0] if len(engines) == 1 else EnginePool(engines)
        if wrap is not None:
            engine = wrap(engine)
        insp = cls(bundle, engine, threshold=threshold, delegate=delegate)
        if smoke_test:
            insp.smoke_test()
        return insp

    @classmethod
    def from_config(cls, cfg, wrap=None) -> "Inspector":
        m = cfg.model
        return cls.load(m.bundle, delegate=m.delegate, threads=m.threads, device=m.device,
                        cpu_fallback=m.cpu_fallback, threshold=m.threshold, views=m.views, wrap=wrap,
                        workers=m.workers)

    def smoke_test(self) -> None:
        """Run the model once (on the bundle's sample image when it has one)."""
        img = None
        if self.bundle.sample and self.bundle.file(self.bundle.sample) is not None:
            img = cv2.imread(str(self.bundle.file(self.bundle.sample)), cv2.IMREAD_UNCHANGED)
        if img is None:
            img = np.full((self.spec.height, self.spec.width), 128, np.uint8)
        try:
            probs = self.infer(self.preprocess(img))
        except Exception as e:  # noqa: BLE001 - any failure here means: do not deploy
            raise InspectorError(f"model {self.bundle.path} does not run: {e}") from None
        if probs.shape != (self.spec.batch, len(self.bundle.labels)) or \
                not np.all(np.isfinite(probs)):
            raise InspectorError(f"model {self.bundle.path} gives output {probs.shape} "
                                 f"(expected {(self.spec.batch, len(self.bundle.labels))})")

    def with_threshold(self, threshold: float | None) -> "Inspector":
        """A copy sharing the engine, deciding at another threshold (None: the bundle's)."""
        new = object.__new__(Inspector)
        new.__dict__.update(self.__dict__)
        t = self.bundle.threshold if threshold is None else float(threshold)
        if not is_threshold(t):
            raise InspectorError(f"threshold {t} is outside [0, 1]")
        new.threshold = t
        new.threshold_source = "bundle" if threshold is None else "override"
        return new

    # -- running -------------------------------------------------------------------------
    def new_buffer(self) -> np.ndarray:
        return np.empty(self.spec.shape, dtype=np.uint8)

    def preprocess(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return preprocess(image, self.spec, out)

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return self.engine.invoke(pixels)

    def decide(self, probs: np.ndarray) -> tuple[Verdict, float, str]:
        score, label = decide(probs, self.bundle, self.threshold)
        return (Verdict.PASS if label == self.good_label else Verdict.REJECT), score, label

    def defect_map(self, pixels: np.ndarray) -> np.ndarray | None:
        """The (h, w) patch map of a part's pixels, or None when the engine gives none. It runs
        the feature model again (the pipeline asks only for REJECTs, after the gate command):
        each tile's first view; of several tiles, the one with the hottest patch."""
        if not self.can_map:
            return None
        views = self.spec.views
        maps = self._maps(pixels[::views] if views > 1 else pixels)
        if not maps:
            return None
        return max(maps, key=lambda m: float(np.max(m)))

    def inspect(self, image: np.ndarray, out: np.ndarray | None = None) -> tuple[Verdict, float, str]:
        """preprocess -> infer -> decide, in the caller's thread."""
        return self.decide(self.infer(self.preprocess(image, out)))

    def describe(self) -> str:
        return (f"{self.bundle.name or self.bundle.path.name} sha256 {self.model_sha256[:12]} on "
                f"{self.engine.describe()}, {self.spec.views} view(s), threshold {self.threshold:g} "
                f"({self.threshold_source})")

    def info(self) -> dict:
        return {"name": self.bundle.name, "path": str(self.bundle.path),
                "sha256": self.model_sha256, "engine": self.engine.describe(),
                "threshold": self.threshold, "labels": list(self.bundle.labels),
                "input": f"{self.spec.width}x{self.spec.height}x{self.spec.channels}",
                "views": self.spec.views}


class WrappedEngine(Engine):
    """Base for test/bench hooks around an engine (slow or failing inference, timing)."""

    name = "wrapped"

    def __init__(self, inner: Engine):
        self.inner = inner

    def invoke(self, pixels):
        return self.inner.invoke(pixels)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.inner.describe()})"


__all__ = ["Inspector", "InspectorError", "WrappedEngine"]
