"""Dataset scanning, loading and hygiene (no TensorFlow here: evaluate uses it too).

Layouts accepted for DATA_DIR:
  DATA_DIR/<class>/*.png|jpg|bmp            one folder per class; `good` is the pass class
  DATA_DIR/train/<class>/..., DATA_DIR/test/<class>/...   (test/ optional, val/ ignored)

Folders holding no images (DeepPCB's `annotations/`, say) are not classes: they are noted
and ignored. Unreadable images are listed, skipped and counted.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.images import IMAGE_EXTS

log = logging.getLogger("convert.data")

GOOD = "good"


class DataError(Exception):
    """A dataset problem the user must fix; the message is one clear line."""


@dataclass
class Split:
    """Image paths per class of one split (train or test)."""
    root: Path
    files: dict[str, list[Path]]                  # class -> sorted paths
    ignored_dirs: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(self.files)

    def items(self) -> list[tuple[Path, str]]:
        return [(p, c) for c in self.classes for p in self.files[c]]

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in sorted(self.files.items())}


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


ANNOTATIONS = "annotations"
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")     # lossless: a mask's edges are its content


def scan_classes(root: Path, *, require_good: bool = True, min_classes: int = 2) -> Split:
    """One folder per class. Raises DataError with a one-line message on a bad layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: dict[str, list[Path]] = {}
    ignored: list[str] = []
    for d in subdirs:
        imgs = _images_in(d)
        if d.name == ANNOTATIONS:      # boxes or mask images (read_boxes), never a class
            ignored.append(d.name)
        elif imgs:
            files[d.name] = imgs
        elif not any(d.iterdir()):
            raise DataError(f"class folder {d} is empty: put its images there or remove it")
        else:
            ignored.append(d.name)
    if ignored:
        # An expected class folder left empty is an error; others (annotations/, masks/) are notes.
        if GOOD in ignored:
            raise DataError(f"class folder {root / GOOD} holds no images (PNG, JPEG or BMP)")
        log.info("ignoring folders with no images (not classes): %s", ", ".join(ignored))
    if not files:
        raise DataError(f"{root} holds no class folders with images: lay the data out as "
                        f"{root}/good/*.png and {root}/<defect>/*.png")
    if require_good and GOOD not in files:
        raise DataError(f"{root} has no '{GOOD}' class folder (the pass class); found classes: "
                        f"{', '.join(sorted(files))}")
    if len(files) < min_classes:
        raise DataError(f"{root} holds a single class ({', '.join(files)}): training needs "
                        f"'{GOOD}' and at least one defect class folder")
    return Split(root=root, files=files, ignored_dirs=ignored)


def scan_dataset(root: Path) -> tuple[Split, Split | None]:
    """(train, test or None) for either layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    if (root / "train").is_dir():
        train = scan_classes(root / "train")
        test = scan_classes(root / "test") if (root / "test").is_dir() else None
        if test is not None:
            extra = set(test.files) - set(train.files)
            if extra:
                raise DataError(f"test/ has classes not in train/: {', '.join(sorted(extra))}")
        return train, test
    return scan_classes(root), None


def scan_eval(root: Path) -> Split:
    """The images to evaluate on: DATA_DIR/test/ when present, else DATA_DIR's class folders."""
    root = Path(root)
    if (root / "test").is_dir():
        root = root / "test"
    return scan_classes(root, require_good=False, min_classes=1)


def read_image(path: Path) -> np.ndarray | None:
    """An image as OpenCV reads it (gray or BGR/BGRA, any depth), or None if unreadable."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None
    return img


def load_split(split: Split, role: str) -> tuple[list[Path], list[str], list[np.ndarray], list[str]]:
    """(paths, classes, images, unreadable paths) of a split; unreadable images are logged,
    skipped and returned so callers can count and report them."""
    paths, classes, images, bad = [], [], [], []
    for p, c in split.items():
        img = read_image(p)
        if img is None:
            bad.append(str(p))
            continue
        paths.append(p)
        classes.append(c)
        images.append(img)
    for b in bad:
        log.warning("unreadable %s image skipped: %s", role, b)
    if bad:
        log.warning("%d unreadable %s image(s) skipped", len(bad), role)
    return paths, classes, images, bad


def read_boxes(split_root: Path, image: Path) -> list[tuple[float, float, float, float]] | None:
    """Optional defect boxes for an image: `<split>/annotations/<stem>.txt`, one box a line,
    `x1 y1 x2 y2 [anything]` in the image's pixels (commas allowed; DeepPCB's format), or a
    defect mask `<split>/annotations/<stem>.png` (or .bmp/.tif) of the image's size, non-zero
    on the defect, as many data sets ship them: each connected blob becomes its bounding box.
    None when the image has no annotation file; malformed lines are skipped with a warning."""
    d, stem = Path(split_root) / ANNOTATIONS, Path(image).stem
    f = d / f"{stem}.txt"
    if not f.is_file():
        for ext in MASK_EXTS:
            m = d / f"{stem}{ext}"
            if m.is_file():
                return _mask_boxes(m)
        return None
    boxes = []
    for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
        v = line.replace(",", " ").split()
        if not v:
            continue
        try:
            x1, y1, x2, y2 = (float(a) for a in v[:4])
        except ValueError:
            log.warning("%s:%d: not 'x1 y1 x2 y2 ...', line skipped", f, n)
            continue
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def _mask_boxes(path: Path) -> list[tuple[float, float, float, float]] | None:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        log.warning("%s: unreadable defect mask, ignored", path)
        return None
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return [(float(x), float(y), float(x + w - 1), float(y + h - 1))
            for x, y, w, h, _ in stats[1:n]]


def box_mask(shape: tuple[int, ...], boxes) -> np.ndarray:
    """uint8 (H, W) mask of an image's size: 255 inside any box."""
    m = np.zeros(shape[:2], np.uint8)
    for x1, y1, x2, y2 in boxes:
        m[max(0, int(y1)):int(np.ceil(y2)) + 1, max(0, int(x1)):int(np.ceil(x2)) + 1] = 255
    return m


def is_color(img: np.ndarray) -> bool:
    """True for a 3/4-channel image whose channels actually differ."""
    if img.ndim != 3 or img.shape[2] < 3:
        return False
    small = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64), :3].astype(np.int16)
    return bool(np.abs(small[..., 0] - small[..., 1]).max() > 8 or
                np.abs(small[..., 1] - small[..., 2]).max() > 8)


# --------------------------------------------------------------------------- near-duplicates

def _gray_small(img: np.ndarray, n: int = 64) -> np.ndarray:
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    return cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)


def _phash(g: np.ndarray) -> np.ndarray:
    """256-bit DCT perceptual hash (16x16 lowest frequencies of a 64x64 gray image)."""
    d = cv2.dct(g)[:16, :16].flatten()
    med = np.median(d[1:])
    return d > med


def dihedral_hashes(img: np.ndarray) -> np.ndarray:
    """(8, 256) bool: the pHash of the image under the 8 flips/rotations."""
    g = _gray_small(img)
    out = []
    for k in range(4):
        r = np.rot90(g, k)
        out.append(_phash(np.ascontiguousarray(r)))
        out.append(_phash(np.ascontiguousarray(r[:, ::-1])))
    return np.stack(out)


def hash_distances(a_hashes: list[np.ndarray], b_hashes: list[np.ndarray]) -> np.ndarray:
    """(len(a), len(b)) int: min over the 8 flips/rotations of a of the Hamming distance
    between a's transformed pHash and b's plain pHash."""
    if not a_hashes or not b_hashes:
        return np.zeros((len(a_hashes), len(b_hashes)), dtype=np.int32)
    A = np.stack(a_hashes).astype(np.float32) * 2 - 1          # (na, 8, bits) in ±1
    B = np.stack([h[0] for h in b_hashes]).astype(np.float32) * 2 - 1   # (nb, bits)
    bits = A.shape[-1]
    dot = np.max(np.einsum("itk,jk->ijt", A, B), axis=2)    # best-matching transform
    return np.rint((bits - dot) / 2).astype(np.int32)


def near_duplicate_groups(hashes: list[np.ndarray], stems: list[str] | None = None,
                          max_distance: int = 24, max_group_fraction: float = 0.2
                          ) -> tuple[np.ndarray, int]:
    """(group id per image, distance used). Near-duplicates share a group (union-find).

    Two images are near-duplicates when some flip/rotation of one is within `max_distance`
    bits (of 256) of the other's pHash. On very uniform products, whole sets of distinct
    parts can look alike; when a group would swallow more than `max_group_fraction` of the
    images the distance is halved until it does not (down to exact copies). Files with the
    same stem in different class folders (a good template and its defective twin, as in
    DeepPCB) are grouped as well.
    """
    n = len(hashes)
    dist = hash_distances(hashes, hashes) if n else np.zeros((0, 0), np.int32)
    dist = np.minimum(dist, dist.T)
    stem_pairs: list[tuple[int, int]] = []
    if stems is not None:
        first: dict[str, int] = {}
        for i, s in enumerate(stems):
            if s in first:
                stem_pairs.append((first[s], i))
            else:
                first[s] = i
    d = max_distance
    while True:
        groups = _union_groups(n, np.argwhere(np.triu(dist <= d, k=1)), stem_pairs)
        biggest = np.bincount(groups).max() if n else 0
        if d == 0 or biggest <= max(2, max_group_fraction * n):
            return groups, d
        d //= 2


def _union_groups(n: int, pairs, extra_pairs) -> np.ndarray:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in list(map(tuple, pairs)) + list(extra_pairs):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    if n == 0:
        return roots
    _, groups = np.unique(roots, return_inverse=True)
    return groups


def group_split(groups: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) by group, so no group straddles; stratified by the
    group's majority label so every class lands in validation."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    by_label: dict[int, list[int]] = {}
    for g in uniq:
        members = labels[groups == g]
        by_label.setdefault(int(np.bincount(members).argmax()), []).append(int(g))
    val_groups: set[int] = set()
    for lbl, gs in sorted(by_label.items()):
        gs = list(gs)
        rng.shuffle(gs)
        n_imgs = sum(int((groups == g).sum()) for g in gs)
        want = max(1, round(val_fraction * n_imgs)) if len(gs) > 1 else 0
        got = 0
        for g in gs:
            if got >= want:
                break
            val_groups.add(g)
            got += int((groups == g).sum())
    is_val = np.isin(groups, list(val_groups))
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def group_folds(groups: np.ndarray, labels: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Indices cut into n_folds disjoint folds by group (no group straddles two), each class
    spread evenly: a group goes to the fold holding the fewest images of its majority label."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    majority = {int(g): int(np.bincount(labels[groups == g]).argmax()) for g in uniq}
    fold_of: dict[int, int] = {}
    for lbl in sorted(set(majority.values())):
        gs = [g for g in uniq if majority[int(g)] == lbl]
        rng.shuffle(gs)
        held = np.zeros(n_folds)
        for g in gs:
            f = int(np.argmin(held))
            fold_of[int(g)] = f
            held[f] += int((groups == g).sum())
    which = np.array([fold_of[int(g)] for g in groups])
    return [np.nonzero(which == f)[0] for f in range(n_folds)]


def fingerprint(paths: list[Path]) -> str:
    """sha256 over (relative name, size, content hash) of every file: the dataset's identity."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.parent.name}/{p.name}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
