"""The model bundle: the contract between convert/ (writes it) and agent/ (reads it).

A directory holding model.tflite (full-integer int8), optionally model_float.tflite and
model_edgetpu.tflite, a sample image for smoke tests, and bundle.json describing labels,
input spec, threshold, metrics, sha256 of every file and provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from agent.frame_checks import InputStats, StatsError, parse_input_stats
from agent.preprocess import InputSpec

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
INT8_MODEL = "model.tflite"
FLOAT_MODEL = "model_float.tflite"
EDGETPU_MODEL = "model_edgetpu.tflite"
# ONNX Runtime / TensorRT (convert.onnx_export, agent.runtime.engines.onnxrt): int8 QDQ and float,
# optional. Not hashed by write_manifest: a retrain into an old bundle's directory must not
# list a model.onnx left there from another model; add_files lists them once they are made.
ONNX_MODEL = "model.onnx"
ONNX_FLOAT_MODEL = "model_float.onnx"
# classifier: model.tflite gives label probabilities; anomaly: model.tflite gives patch features
# and memory.npz (agent.runtime.anomaly) the good patches they are compared with.
KINDS = ("classifier", "anomaly")
ANOMALY_MEMORY = "memory.npz"
# A classifier's defect map (convert.model.Lite0Classifier.map_model): pixels -> per-cell
# evidence in [0, 1]; optional, run for rejects only so the operator page can show where.
MAP_MODEL = "model_map.tflite"


class BundleError(Exception):
    """A bundle that must not be used; the message says why and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    labels: list[str]
    good_label: str
    defect_labels: list[str]
    input: InputSpec
    threshold: float
    files: dict[str, dict]
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    sample: str | None = None
    name: str = ""
    # sha256 of bundle.json as read: the bundle's identity (it lists every file's sha256,
    # so a re-tuned threshold is a new bundle even when model.tflite is unchanged).
    manifest_sha256: str = ""
    # Statistics of the training images (agent.frame_checks.image_stats), or None.
    input_stats: InputStats | None = None
    kind: str = "classifier"

    @property
    def model_path(self) -> Path:
        return self.path / INT8_MODEL

    @property
    def model_sha256(self) -> str:
        return self.files[INT8_MODEL]["sha256"]

    def file(self, name: str) -> Path | None:
        return self.path / name if name in self.files else None

    @property
    def defect_indices(self) -> list[int]:
        return [self.labels.index(lbl) for lbl in self.defect_labels]

    def with_views(self, views: int | None) -> "Bundle":
        """This bundle scoring every tile with only its first `views` mirror views (1, 2, 4):
        a slow box runs the model fewer times a frame, at the threshold the trainer chose on
        validation for that many views (metrics.threshold_selection.by_views), not at the
        one chosen for all of them."""
        if views is None or views == self.input.views:
            return self
        table = (self.metrics.get("threshold_selection") or {}).get("by_views") or {}
        if views > self.input.views or str(views) not in table:
            have = sorted(int(v) for v in table) or [self.input.views]
            raise BundleError(f"{self.path}: no operating point for {views} view(s); this bundle "
                              f"can score {', '.join(map(str, have))} (retrain with this trainer, or "
                              f"set model.views to one of those)")
        return replace(self, input=replace(self.input, views=views),
                       threshold=float(table[str(views)]["threshold"]))

    def to_manifest(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "labels": self.labels,
            "good_label": self.good_label,
            "defect_labels": self.defect_labels,
            "input": self.input.to_dict(),
            "threshold": self.threshold,
            "files": self.files,
            "sample": self.sample,
            "metrics": self.metrics,
            "provenance": self.provenance,
            **({"input_stats": self.input_stats.model_dump()}
               if self.input_stats is not None else {}),
        }


def write_manifest(bundle_dir: Path, *, labels, good_label, input_spec: InputSpec, threshold: float,
                   metrics: dict, provenance: dict, sample: str | None = None, name: str = "",
                   input_stats: dict | None = None, kind: str = "classifier",
                   extra_files: tuple[str, ...] = ()) -> Bundle:
    """Hash every model file present in bundle_dir and write bundle.json. Used by convert."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for fname in (INT8_MODEL, FLOAT_MODEL, EDGETPU_MODEL, *extra_files) + ((sample,) if sample else ()):
        p = bundle_dir / fname
        if p.exists():
            files[fname] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    b = Bundle(path=bundle_dir, labels=list(labels), good_label=good_label,
               defect_labels=[lbl for lbl in labels if lbl != good_label], input=input_spec,
               threshold=float(threshold), files=files, metrics=metrics, provenance=provenance,
               sample=sample, name=name or bundle_dir.name,
               input_stats=None if input_stats is None else parse_input_stats(input_stats),
               kind=kind)
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(b.to_manifest(), indent=2, sort_keys=False) + "\n")
    tmp.replace(bundle_dir / MANIFEST)
    return b


def add_files(bundle_dir: Path, names: tuple[str, ...], *, metrics: dict | None = None) -> Bundle:
    """List (hash) more files in an existing bundle.json, merging `metrics` into its metrics,
    and keep everything else it says as written. The bundle must verify first: hashing new
    files into a bundle whose old ones were changed would bless the change."""
    bundle_dir = Path(bundle_dir)
    load_bundle(bundle_dir)
    mpath = bundle_dir / MANIFEST
    m = json.loads(mpath.read_bytes())
    for fname in names:
        _confine(bundle_dir, fname, mpath)
        p = bundle_dir / fname
        if not p.is_file():
            raise BundleError(f"bundle {bundle_dir}: cannot list {fname}: it does not exist")
        m["files"][fname] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    if metrics:
        m["metrics"] = {**(m.get("metrics") or {}), **metrics}
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=False) + "\n")
    tmp.replace(mpath)
    return load_bundle(bundle_dir)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read bundle.json and (by default) verify every file's sha256. Raises BundleError."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist or is not a directory")
    if not mpath.is_file():
        raise BundleError(f"{path} is not a model bundle: {MANIFEST} is missing "
                          "(make one with 'edge-inspect train')")
    raw = mpath.read_bytes()
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    fmt = m.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{mpath}: bundle format {fmt!r} is not supported by this agent "
                          f"(expects {BUNDLE_FORMAT}); upgrade edge-inspect or re-export the model")
    try:
        labels = [str(x) for x in m["labels"]]
        good = str(m["good_label"])
        defects = [str(x) for x in m["defect_labels"]]
        spec = InputSpec.from_dict(m["input"])
        threshold = float(m["threshold"])
        files = dict(m["files"])
    except KeyError as e:
        raise BundleError(f"{mpath}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid field: {e}") from None
    if len(labels) < 2 or good not in labels or not defects or any(d not in labels for d in defects):
        raise BundleError(f"{mpath}: labels {labels} must hold good_label {good!r} "
                          f"and the defect labels {defects}")
    if not 0.0 <= threshold <= 1.0:
        raise BundleError(f"{mpath}: threshold {threshold} is outside [0, 1]")
    if INT8_MODEL not in files:
        raise BundleError(f"{mpath}: lists no {INT8_MODEL}")
    kind = m.get("kind", "classifier")
    if kind not in KINDS:
        raise BundleError(f"{mpath}: kind {kind!r} is not one this agent knows ({', '.join(KINDS)}); "
                          "upgrade edge-inspect")
    if kind == "anomaly" and ANOMALY_MEMORY not in files:
        raise BundleError(f"{mpath}: an anomaly bundle must list its memory file {ANOMALY_MEMORY}")
    sample = m.get("sample")
    for fname in [*files, *([sample] if sample is not None else [])]:
        _confine(path, fname, mpath)
    b = Bundle(path=path, labels=labels, good_label=good, defect_labels=defects, input=spec,
               threshold=threshold, files=files, metrics=m.get("metrics") or {},
               provenance=m.get("provenance") or {}, sample=sample, name=m.get("name", ""),
               manifest_sha256=hashlib.sha256(raw).hexdigest(),
               input_stats=_input_stats(m.get("input_stats"), mpath), kind=kind)
    if verify:
        verify_files(b)
    return b


def _confine(root: Path, name, mpath: Path) -> None:
    """A file name from bundle.json must name a file inside the bundle directory: a bundle
    is copied and hashed by name, so '/etc/passwd' or '../x' would read (and deploy) files
    from anywhere on the box."""
    why = None
    if not isinstance(name, str) or not name:
        why = "is not a file name"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() \
            or name.startswith("\\"):
        why = "is an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        why = "contains '..'"
    else:
        base = root.resolve()
        if not (base / name).resolve().is_relative_to(base):
            why = "resolves outside the bundle directory (a symlink?)"
    if why:
        raise BundleError(f"{mpath}: file name {str(name)[:200]!r} {why}; a bundle may only "
                          "name files inside its own directory")


def _input_stats(raw, mpath: Path) -> InputStats | None:
    """The optional input_stats object (schema: agent.frame_checks); None when absent."""
    if raw is None:
        return None
    try:
        return parse_input_stats(raw)
    except StatsError as e:
        raise BundleError(f"{mpath}: input_stats: {e}") from None


def verify_files(b: Bundle) -> None:
    for fname, info in b.files.items():
        p = b.path / fname
        if not p.is_file():
            raise BundleError(f"bundle {b.path}: {fname} is listed in {MANIFEST} but missing")
        actual = sha256_file(p)
        if actual != info.get("sha256"):
            raise BundleError(f"bundle {b.path}: {fname} is corrupt or was changed after export "
                              f"(sha256 {actual[:12]}… != {str(info.get('sha256'))[:12]}… in "
                              f"{MANIFEST}); re-copy or re-export the bundle")
