"""The data stage of `edge-inspect train`: read the class folders, group near-duplicates
(flips/rotations included) so no group straddles train/validation/test, split by group,
and preprocess once through agent.preprocess (the runtime's own function)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np

from agent.preprocess import InputSpec, preprocess

from .data import (GOOD, DataError, dihedral_hashes, group_folds, group_split, hash_distances,
                   is_color, load_split, near_duplicate_groups, read_boxes, scan_dataset)
from .options import TrainOptions

log = logging.getLogger("convert.train")

MIN_PER_CLASS = 2          # readable images a class needs to be trained on at all
MIN_VALIDATION = 2         # validation images of each side (good, defect) a threshold needs
# Default input side (about; aspect ratio kept, never above native). Whole-frame training
# at 640 px costs four times 320 px per epoch; crop training (every defect boxed) costs the
# same at any input size, so boxed data gets the resolution that small defects need.
DEFAULT_MAX_SIDE = 320
DEFAULT_MAX_SIDE_BOXED = 640
MAX_TILE_ASPECT = 2.0       # auto tiles (label-only data): no tile longer than twice its width


def auto_tiles(images: list[np.ndarray], max_aspect: float = MAX_TILE_ASPECT) -> tuple[int, int]:
    """Tiles for elongated frames: cut along the long side until every tile's aspect ratio is
    at most max_aspect, so a 4096x256 line-scan strip becomes 8 tiles of 512x256 instead of
    one input squashed 3x (its small defects would vanish)."""
    aspect = float(np.median([im.shape[1] / im.shape[0] for im in images]))
    if aspect > max_aspect:
        return 1, int(math.ceil(aspect / max_aspect))
    if aspect < 1.0 / max_aspect:
        return int(math.ceil(1.0 / (aspect * max_aspect))), 1
    return 1, 1


def auto_spec(images: list[np.ndarray], opts: TrainOptions, max_side: int = DEFAULT_MAX_SIDE) -> InputSpec:
    color = opts.color
    if color == "auto":
        sample = images[:: max(1, len(images) // 200)]
        color = "rgb" if any(is_color(im) for im in sample) else "gray"
    if opts.input_size:
        w, h = opts.input_size
    else:
        rows, cols = opts.tiles
        hs = np.array([im.shape[0] / rows for im in images])
        ws = np.array([im.shape[1] / cols for im in images])
        aspect = float(np.median(ws / hs))
        side = min(max_side, float(np.sqrt(np.median(hs * ws))))
        side = max(64.0, side)
        # Keep the frame's aspect ratio at about side*side pixels, multiples of 16.
        w = int(max(32, round(side * math.sqrt(aspect) / 16) * 16))
        h = int(max(32, round(side / math.sqrt(aspect) / 16) * 16))
    return InputSpec(width=w, height=h, channels=3 if color != "gray" else 1, color=color,
                     fit=opts.fit, tiles=opts.tiles)


@dataclasses.dataclass
class TrainingSet:
    """Everything the later stages need of the data, read and split once."""
    labels: list[str]                  # good first
    train_split: object                # convert.data.Split of train/
    test_split: object | None
    tr_paths: list[Path]
    tr_cls: list[str]
    tr_imgs: list[np.ndarray]
    tr_bad: list[str]
    te_cls: list[str]
    te_imgs: list[np.ndarray]
    te_bad: list[str]
    tr_boxes: list
    boxed: bool                        # every defect image has boxes or masks
    spec: InputSpec                    # what the model trains on (one view)
    bspec: InputSpec                   # what the bundle scores (every view)
    y: np.ndarray                      # label index of every training-folder image
    tr_i: np.ndarray                   # trained on
    va_i: np.ndarray                   # the exported model's validation
    folds: list[np.ndarray]            # disjoint parts of tr_i for out-of-fold refits
    X: np.ndarray                      # (N, tiles, H, W, C) uint8, as agent.preprocess gives
    Xte: np.ndarray | None
    dup_report: dict
    opts: TrainOptions                 # as asked, with the tiles the data chose

    @property
    def views(self) -> int:
        return self.bspec.views

    @property
    def good_idx(self) -> int:
        return self.labels.index(GOOD)

    def rel(self, i: int) -> str:
        return str(self.tr_paths[i].relative_to(self.train_split.root))

    def held_back(self) -> "HeldBack":
        """What the bundle is judged on after training: test/ if there is one, else validation."""
        if self.Xte is not None and len(self.Xte):
            return HeldBack("test", self.Xte, list(self.te_cls), self.te_imgs)
        va = self.va_i
        return HeldBack("validation", self.X[va], [self.labels[i] for i in self.y[va]],
                        [self.tr_imgs[i] for i in va])


@dataclasses.dataclass
class HeldBack:
    name: str                          # "test" or "validation"
    X: np.ndarray                      # preprocessed, as TrainingSet.X
    truth: list[str]
    images: list[np.ndarray]


def load_training_set(data_dir: Path, opts: TrainOptions) -> TrainingSet:
    """Raises DataError (exit 2) for data that cannot train a bundle."""
    train_split, test_split = scan_dataset(data_dir)
    labels = [GOOD] + [c for c in train_split.classes if c != GOOD]
    log.info("classes: %s (good = pass class); train counts %s%s", ", ".join(labels),
             train_split.counts(), f"; test counts {test_split.counts()}" if test_split else "")
    if train_split.ignored_dirs:
        log.info("note: folders with no images were ignored: %s", ", ".join(train_split.ignored_dirs))

    tr_paths, tr_cls, tr_imgs, tr_bad = load_split(train_split, "train")
    counts = {c: tr_cls.count(c) for c in labels}
    too_few = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if too_few:
        raise DataError("too few readable images to train: " + ", ".join(
            f"class '{c}' has {n}" for c, n in too_few.items()) + f" (need >= {MIN_PER_CLASS} each)")
    _, te_cls, te_imgs, te_bad = load_split(test_split, "test") if test_split else ([], [], [], [])
    unknown = sorted(set(te_cls) - set(labels))
    if unknown:
        raise DataError(f"test classes not seen in training: {', '.join(unknown)}")

    tr_boxes = [read_boxes(train_split.root, p) if c != GOOD else None for p, c in zip(tr_paths, tr_cls)]
    boxed = all(b for b, c in zip(tr_boxes, tr_cls) if c != GOOD)        # as defect_masks counts them
    if not boxed and opts.tiles == (1, 1) and opts.input_size is None and opts.backbone != "scratch":
        tiles = auto_tiles(tr_imgs)
        if tiles != (1, 1):
            log.info("frames are elongated (median aspect ratio beyond %g): %dx%d tiles", MAX_TILE_ASPECT, *tiles)
            opts = dataclasses.replace(opts, tiles=tiles)
    spec = auto_spec(tr_imgs, opts, DEFAULT_MAX_SIDE_BOXED if boxed and opts.crops and opts.tiles == (1, 1)
                     else DEFAULT_MAX_SIDE)
    # The model trains on one view of each image (spec); the bundle scores every tile as the
    # mean of its mirror views (bspec), which the flip augmentation has made equally valid.
    views = opts.views or (4 if opts.flips else 1)
    bspec = dataclasses.replace(spec, views=views)
    log.info("input spec: %dx%d %s, fit %s, tiles %dx%d, %d view(s) scored per tile", spec.width,
             spec.height, spec.color, spec.fit, *spec.tiles, views)

    th = time.perf_counter()
    groups, dup_report, leak_drop = _near_duplicates(train_split, tr_paths, tr_imgs, te_imgs, opts)
    y = np.array([labels.index(c) for c in tr_cls])
    keep = np.nonzero(~leak_drop)[0]
    tr_i, va_i = group_split(groups[keep], y[keep], opts.val_fraction, opts.seed)
    tr_i, va_i = keep[tr_i], keep[va_i]
    _check_split(labels, y, tr_i, va_i, opts)
    log.info("split by near-duplicate group (seed %d): %d train, %d validation%s  [%.1fs]",
             opts.seed, len(tr_i), len(va_i), f", {len(te_imgs)} test" if te_imgs else "",
             time.perf_counter() - th)
    # The exported model validates on va_i; k - 1 refits without one part of tr_i each score
    # that part, so the threshold can rest on every training image (convert.finetune).
    folds = ([tr_i[f] for f in group_folds(groups[tr_i], y[tr_i], opts.folds - 1, opts.seed)]
             if opts.folds > 1 else [])
    return TrainingSet(labels=labels, train_split=train_split, test_split=test_split,
                       tr_paths=tr_paths, tr_cls=tr_cls, tr_imgs=tr_imgs, tr_bad=tr_bad,
                       te_cls=te_cls, te_imgs=te_imgs, te_bad=te_bad, tr_boxes=tr_boxes, boxed=boxed,
                       spec=spec, bspec=bspec, y=y, tr_i=tr_i, va_i=va_i, folds=folds,
                       X=prepare(tr_imgs, spec), Xte=prepare(te_imgs, spec) if te_imgs else None,
                       dup_report=dup_report, opts=opts)


def prepare(imgs: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Preprocess once, through the runtime's own function."""
    out = np.empty((len(imgs),) + spec.shape, dtype=np.uint8)
    for i, im in enumerate(imgs):
        preprocess(im, spec, out=out[i])
    return out


def _near_duplicates(train_split, tr_paths, tr_imgs, te_imgs, opts: TrainOptions):
    """(group of every training image, report, training images dropped as test duplicates)."""
    tr_hash = [dihedral_hashes(im) for im in tr_imgs]
    stems = [p.stem for p in tr_paths]
    groups, dup_d = near_duplicate_groups(tr_hash, stems, max_distance=opts.dup_distance)
    hash_only, _ = near_duplicate_groups(tr_hash, None, max_distance=dup_d)
    multi = [g for g in np.unique(hash_only) if (hash_only == g).sum() > 1]
    dup_report = {"hash_distance_bits": int(dup_d), "groups": int(groups.max() + 1),
                  "near_duplicate_groups": len(multi),
                  "near_duplicate_images": int(sum((hash_only == g).sum() for g in multi))}
    if multi:
        ex = [str(tr_paths[i].relative_to(train_split.root)) for i in np.nonzero(hash_only == multi[0])[0][:3]]
        log.info("near-duplicates found: %d groups covering %d images (e.g. %s); each group "
                 "is kept on one side of the split", len(multi), dup_report["near_duplicate_images"],
                 " ~ ".join(ex))
    leak_drop = np.zeros(len(tr_imgs), dtype=bool)
    if te_imgs:
        te_hash = [dihedral_hashes(im) for im in te_imgs]
        cross = hash_distances(tr_hash, te_hash) <= dup_d
        leak_drop = cross.any(axis=1)
        if leak_drop.any():
            log.warning("%d training image(s) are near-duplicates of test images and are left "
                        "out of training (e.g. %s)", int(leak_drop.sum()),
                        tr_paths[int(np.nonzero(leak_drop)[0][0])])
    dup_report["train_images_dropped_as_test_duplicates"] = int(leak_drop.sum())
    return groups, dup_report, leak_drop


def _check_split(labels, y, tr_i, va_i, opts: TrainOptions) -> None:
    for c in labels:
        if not np.any(y[va_i] == labels.index(c)) or not np.any(y[tr_i] == labels.index(c)):
            raise DataError(f"class '{c}' has too few distinct images (after near-duplicate "
                            "grouping) for both a training and a validation part")
    va_good = int(np.sum(y[va_i] == labels.index(GOOD)))
    va_def = len(va_i) - va_good
    if min(va_good, va_def) < MIN_VALIDATION:
        # The threshold is chosen on these images; with one or two of a kind it is a guess
        # that a bundle would carry as if it were measured.
        raise DataError(f"validation holds {va_good} good and {va_def} defect image(s): choosing a "
                        f"threshold needs at least {MIN_VALIDATION} of each (add images, or raise "
                        f"--val-fraction from {opts.val_fraction:g})")
