"""Pictures of a model on a labelled image set: PNG figures and one self-contained HTML page.

`write_report(out_dir, ...)` writes into `out_dir/report/`:

- `history.png`    loss / validation loss and validation AUC per epoch (when a history is given)
- `roc.png`        the ROC curve (false-reject rate vs defects caught) with its AUC
- `tradeoff.png`   escape vs false reject over every threshold, the chosen operating point marked
- `confusion.png`  truth class (good and each defect class) x verdict (passed / rejected)
- `gallery_threshold.png`      the lowest-scoring defects: the images that set the threshold
- `gallery_false_rejects.png`  the highest-scoring good images: the worst false rejects
- `scores.csv`     every image's file, truth, score, verdict at the threshold and where its
  score came from: the raw material to study another threshold policy offline
- `index.html`     the key figures as text and every PNG, embedded (the page stands alone when
  copied) and linked to its file

Used by `edge-inspect train` (the bundle's report) and `edge-inspect evaluate --report DIR`.
matplotlib (the `train` extra) is imported only inside write_report, with the Agg backend and
without pyplot (no global state, no display); the agent never imports this module.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .threshold import OPERATING_POINTS, operating_points, rates_at, roc_auc

GALLERY = 8          # images per gallery
THUMB = 224          # longest side of a gallery thumbnail, pixels
DPI = 100

FIGURES = ("history.png", "roc.png", "tradeoff.png", "confusion.png",
           "gallery_threshold.png", "gallery_false_rejects.png")


@dataclass
class ScoredSet:
    """A labelled image set and a model's defect score for each image.

    scores: defect score per image, 0..1, higher = more defective (agent.decide.defect_score).
    truth:  class name per image.
    files:  file name (or path) per image, shown in the galleries.
    images: decoded uint8 images, gray or BGR(A) as OpenCV reads them.
    maps:   optional per-image float defect map (h, w) at any resolution, overlaid as a heat
            map stretched over the image; None (or a None entry) for no overlay. Values within
            [0, 1] are drawn on that fixed scale, others from the map's own min to max.
    sources: optional per-image origin of the score (train: "validation", "out-of-fold 2"),
            written to scores.csv.
    """

    scores: np.ndarray
    truth: list[str]
    files: list[str]
    images: list[np.ndarray]
    maps: list[np.ndarray | None] | None = None
    sources: list[str] | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = self.scores.size
        if n == 0:
            raise ValueError("ScoredSet: no images")
        lens = {"truth": len(self.truth), "files": len(self.files), "images": len(self.images)}
        for k in ("maps", "sources"):
            if getattr(self, k) is not None:
                lens[k] = len(getattr(self, k))
        bad = {k: v for k, v in lens.items() if v != n}
        if bad:
            raise ValueError(f"ScoredSet: {n} scores but " + ", ".join(f"{v} {k}" for k, v in bad.items()))


def gallery_indices(scored: ScoredSet, good: str, k: int = GALLERY) -> tuple[list[int], list[int]]:
    """(lowest-scoring defects, highest-scoring good images), at most k of each, in the order
    shown. A caller that computes defect maps only for the images shown uses this."""
    s = scored.scores
    is_def = np.array([t != good for t in scored.truth])
    idx = np.arange(s.size)
    d, g = idx[is_def], idx[~is_def]
    low_def = d[np.argsort(s[d], kind="stable")][:k]
    high_good = g[np.argsort(-s[g], kind="stable")][:k]
    return [int(i) for i in low_def], [int(i) for i in high_good]


def _curve(scores: np.ndarray, is_def: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, escape rate, false-reject rate) for deciding `score >= t` at every distinct
    score, plus one threshold above them all (everything passes); escape rises, false reject
    falls along it."""
    ts = np.unique(scores)
    ts = np.r_[ts, np.nextafter(ts[-1], np.inf)]
    d, g = np.sort(scores[is_def]), np.sort(scores[~is_def])
    esc = np.searchsorted(d, ts, side="left") / d.size if d.size else np.zeros(ts.size)
    fr = 1.0 - np.searchsorted(g, ts, side="left") / g.size if g.size else np.zeros(ts.size)
    return ts, esc, fr


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


def _plot_history(history: list[dict], path: Path) -> None:
    fig = _new_figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def series(key):
        xs = [e for e, h in zip(ep, history) if h.get(key) is not None]
        ys = [float(h[key]) for h in history if h.get(key) is not None]
        return xs, ys

    for key, style in (("loss", "o-"), ("val_loss", "s-")):
        xs, ys = series(key)
        if xs:
            ax1.plot(xs, ys, style, ms=3, label=key.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss per epoch")
    ax1.grid(alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend()
    xs, ys = series("val_auc")
    if xs:
        ax2.plot(xs, ys, "o-", ms=3, color="tab:green")
        best = int(np.argmax(ys))
        ax2.annotate(f"best {ys[best]:.4f} (epoch {xs[best]})", (xs[best], ys[best]),
                     textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax2.set_ylim(min(0.5, min(ys)) - 0.02, 1.01)
    else:
        ax2.text(0.5, 0.5, "no validation AUC recorded", ha="center", va="center",
                 transform=ax2.transAxes)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation ROC AUC")
    ax2.set_title("validation AUC per epoch")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _plot_roc(esc: np.ndarray, fr: np.ndarray, auc: float, at: dict, path: Path) -> None:
    fig = _new_figure(5.2, 4.8)
    ax = fig.subplots()
    tpr = 1.0 - esc                                 # defects caught
    if math.isnan(auc):
        ax.text(0.5, 0.5, "ROC undefined: needs good and defect images", ha="center",
                va="center", transform=ax.transAxes)
    else:
        ax.plot(fr[::-1], tpr[::-1], color="tab:blue", lw=2,
                label=f"AUC {auc:.4f}")
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1, label="chance")
        ax.plot([at["false_reject_rate"]], [1.0 - at["escape_rate"]], "o", color="tab:red",
                label="threshold")
        ax.legend(loc="lower right")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false-reject rate (good parts rejected)")
    ax.set_ylabel("defects caught (1 - escape rate)")
    ax.set_title("ROC")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _plot_tradeoff(esc, fr, threshold: float, at: dict, max_escape: float | None,
                   points: list[dict], path: Path) -> None:
    fig = _new_figure(6.4, 4.8)
    ax = fig.subplots()
    ax.plot(100 * esc, 100 * fr, color="tab:blue", lw=2, label="every threshold")
    same: dict[tuple[float, float], list[str]] = {}       # targets that pick the same point
    for p in points:
        same.setdefault((100 * p["escape_rate"], 100 * p["false_reject_rate"]), []).append(
            f"{100 * p['max_escape']:g}")
    for (x, y), names in same.items():
        ax.plot([x], [y], "x", color="gray", ms=6)
        ax.annotate("target " + "/".join(names) + " %", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="gray")
    ax.plot([100 * at["escape_rate"]], [100 * at["false_reject_rate"]], "o", color="tab:red", ms=8,
            label=f"threshold {threshold:.4f}: escape {100 * at['escape_rate']:.2f} %, "
                  f"false reject {100 * at['false_reject_rate']:.2f} %")
    if max_escape is not None:
        ax.axvline(100 * max_escape, ls="--", color="tab:orange", lw=1,
                   label=f"escape target {100 * max_escape:g} %")
    ax.set_xlabel("escape rate, % (defects passed as good)")
    ax.set_ylabel("false-reject rate, % (good parts rejected)")
    ax.set_title("escape vs false reject")
    marked = [at["escape_rate"], max_escape or 0.0] + [p["escape_rate"] for p in points]
    right = min(100.0, max(10.0, 150.0 * max(marked)))     # the low-escape end is what matters
    ax.set_xlim(-right / 100, right)
    ax.set_ylim(-1, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def _confusion(scored: ScoredSet, threshold: float, labels: list[str], good: str) -> tuple[list[str], np.ndarray]:
    """(row classes, counts[class, (passed, rejected)]): good first, then the bundle's labels
    that occur, then any other truth class."""
    present = set(scored.truth)
    rows = [good] if good in present else []
    rows += [c for c in labels if c != good and c in present]
    rows += sorted(present - set(rows))
    rej = scored.scores >= threshold
    counts = np.zeros((len(rows), 2), dtype=np.int64)
    pos = {c: i for i, c in enumerate(rows)}
    for t, r in zip(scored.truth, rej):
        counts[pos[t], int(r)] += 1
    return rows, counts


def _plot_confusion(rows: list[str], counts: np.ndarray, good: str, threshold: float, path: Path) -> None:
    fig = _new_figure(5.0, 1.6 + 0.45 * len(rows))
    ax = fig.subplots()
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, c in enumerate(rows):
        for j in range(2):
            wrong = (j == 1) if c == good else (j == 0)
            ax.text(j, i, f"{counts[i, j]}\n({100 * frac[i, j]:.1f} %)", ha="center", va="center",
                    fontsize=9, color="white" if frac[i, j] > 0.6 else ("tab:red" if wrong and counts[i, j] else "black"))
    ax.set_xticks([0, 1], ["passed (good)", "rejected (defect)"])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("verdict")
    ax.set_ylabel("truth")
    ax.set_title(f"confusion at threshold {threshold:.4f}")
    fig.tight_layout()
    _save(fig, path)


def _thumb(img: np.ndarray) -> np.ndarray:
    """RGB (or gray) uint8 thumbnail, longest side <= THUMB."""
    import cv2

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = cv2.normalize(a, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    h, w = a.shape[:2]
    f = THUMB / max(h, w)
    if f < 1:
        a = cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2RGB if a.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return a


def _plot_gallery(scored: ScoredSet, idx: list[int], threshold: float, good: str, title: str,
                  empty: str, path: Path) -> int:
    """A grid of images with score, class and verdict; the defect map overlaid when given.
    Returns how many images carry a map."""
    cols = 4
    n = max(1, len(idx))
    rows = math.ceil(n / cols)
    fig = _new_figure(3.0 * cols, 0.6 + 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    with_map = 0
    for ax in axes:
        ax.axis("off")
    if not idx:
        axes[0].text(0, 0.5, empty, ha="left", va="center", transform=axes[0].transAxes)
    for ax, i in zip(axes, idx):
        t = _thumb(scored.images[i])
        h, w = t.shape[:2]
        ax.imshow(t, cmap="gray" if t.ndim == 2 else None, vmin=0, vmax=255,
                  extent=(0, w, h, 0), interpolation="bilinear")
        m = scored.maps[i] if scored.maps is not None else None
        if m is not None:
            m = np.asarray(m, dtype=np.float32)
            m = m.reshape(m.shape[:2]) if m.ndim == 3 and m.shape[2] == 1 else m
            if m.ndim == 2 and m.size:
                lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
                if lo >= 0.0 and hi <= 1.0:
                    lo, hi = 0.0, 1.0
                elif hi <= lo:
                    hi = lo + 1e-6
                ax.imshow(m, cmap="inferno", vmin=lo, vmax=hi, alpha=0.45, extent=(0, w, h, 0),
                          interpolation="bilinear")
                with_map += 1
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        s = float(scored.scores[i])
        verdict = "rejected" if s >= threshold else "PASSED"
        name = Path(str(scored.files[i])).name
        name = name if len(name) <= 28 else name[:12] + "…" + name[-15:]
        wrong = (scored.truth[i] != good) == (s < threshold)     # an escape or a false reject
        ax.set_title(f"{name}\n{scored.truth[i]}  score {s:.4f}  {verdict}", fontsize=8,
                     color="tab:red" if wrong else "black")
    fig.suptitle(title, fontsize=11)
    top = 1.0 - 0.6 / (0.6 + 3.4 * rows)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top - 0.01, wspace=0.05,
                        hspace=0.25 * 3.4 / 3.0)
    _save(fig, path)
    return with_map


def _write_scores(scored: ScoredSet, threshold: float, good: str, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "truth", "defect", "score", "verdict", "source"])
        for i, (file, truth) in enumerate(zip(scored.files, scored.truth)):
            sc = float(scored.scores[i])
            w.writerow([file, truth, int(truth != good), repr(sc),
                        "reject" if sc >= threshold else "pass",
                        scored.sources[i] if scored.sources is not None else ""])


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def write_report(out_dir: Path, *, title: str, history: list[dict] | None, scored: ScoredSet,
                 threshold: float, max_escape: float | None, labels: list[str], good: str) -> Path:
    """Write the report into out_dir/report/ and return the path of its index.html.

    history: per-epoch dicts {"epoch", "loss", "val_loss", "val_auc"} (missing values None),
    or None for no training curves (evaluate). threshold: the operating point (defect when
    score >= threshold). max_escape: the escape target the threshold was chosen for, if any.
    labels / good: the bundle's labels and its good (pass) label.
    """
    import matplotlib  # noqa: F401  (the train extra; a clear ImportError without it)

    out = Path(out_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    threshold = float(threshold)
    s = scored.scores
    is_def = np.array([t != good for t in scored.truth])
    n_def, n_good = int(is_def.sum()), int((~is_def).sum())
    auc = roc_auc(s, is_def)
    at = rates_at(s, is_def, threshold)
    points = operating_points(s, is_def, OPERATING_POINTS) if n_def else []
    _, esc, fr = _curve(s, is_def)

    figures: list[tuple[str, str]] = []     # (file, caption)
    if history:
        _plot_history(history, out / "history.png")
        figures.append(("history.png", "Loss and validation ROC AUC per epoch."))
    else:
        (out / "history.png").unlink(missing_ok=True)       # a stale one from an earlier run
    _plot_roc(esc, fr, auc, at, out / "roc.png")
    figures.append(("roc.png", "ROC curve; the red dot is the threshold."))
    _plot_tradeoff(esc, fr, threshold, at, max_escape, points, out / "tradeoff.png")
    figures.append(("tradeoff.png", "Escape vs false reject over every threshold; red: the "
                    "threshold in use; grey crosses: the threshold each escape target would pick "
                    "on this very set (what the model allows, not what a policy guarantees)."))
    rows, counts = _confusion(scored, threshold, labels, good)
    _plot_confusion(rows, counts, good, threshold, out / "confusion.png")
    figures.append(("confusion.png", "Truth class x verdict at the threshold."))
    low_def, high_good = gallery_indices(scored, good)
    m1 = _plot_gallery(scored, low_def, threshold, good, "defects that set the threshold (lowest scores)",
                       "no defect images", out / "gallery_threshold.png")
    figures.append(("gallery_threshold.png", "The lowest-scoring defects: those under the "
                    "threshold escape; the others set how low it must be."
                    + (" Defect map overlaid." if m1 else "")))
    m2 = _plot_gallery(scored, high_good, threshold, good, "worst false rejects (highest-scoring good images)",
                       "no good images", out / "gallery_false_rejects.png")
    figures.append(("gallery_false_rejects.png", "The highest-scoring good images: those at or "
                    "over the threshold are rejected." + (" Defect map overlaid." if m2 else "")))

    _write_scores(scored, threshold, good, out / "scores.csv")
    esc_n = int((s[is_def] < threshold).sum())
    fr_n = int((s[~is_def] >= threshold).sum())
    key = [("images", f"{s.size} ({n_good} good, {n_def} defect)"),
           ("ROC AUC", "undefined (needs good and defect images)" if math.isnan(auc) else f"{auc:.4f}"),
           ("threshold", f"{threshold:.4f}" + (f" (chosen for escape &le; {100 * max_escape:g} %)"
                                               if max_escape is not None else "")),
           ("accuracy", _pct(at["accuracy"])),
           ("escape", f"{_pct(at['escape_rate'])} ({esc_n} of {n_def} defects passed as good)"),
           ("false reject", f"{_pct(at['false_reject_rate'])} ({fr_n} of {n_good} good parts rejected)")]
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}"
             "figcaption{color:#444;font-size:90%}</style></head><body>",
             f"<h1>{e(title)}</h1>", "<h2>At the threshold</h2>", "<table id='key'>"]
    parts += [f"<tr><th>{k}</th><td>{v if k == 'threshold' else e(v)}</td></tr>" for k, v in key]
    parts.append("</table>")
    if points:
        parts += ["<h2>Operating points on this set</h2>",
                  "<p>The threshold each escape target picks on these very scores: what the model "
                  "can do here, apart from the threshold policy.</p>",
                  "<table id='points'><tr><th>escape target</th><th>threshold</th><th>escape</th>"
                  "<th>false reject</th></tr>"]
        parts += [f"<tr><td>{100 * p['max_escape']:g} %</td><td>{p['threshold']:.4f}</td>"
                  f"<td>{_pct(p['escape_rate'])}</td><td>{_pct(p['false_reject_rate'])}</td></tr>"
                  for p in points]
        parts.append("</table>")
    parts += ["<h2>Confusion at the threshold</h2>",
              "<table id='confusion'><tr><th>truth</th><th>passed</th><th>rejected</th></tr>"]
    parts += [f"<tr><td>{e(c)}</td><td>{a}</td><td>{b}</td></tr>" for c, (a, b) in zip(rows, counts)]
    parts.append("</table>")
    parts.append("<p>Every image's score and verdict: <a href='scores.csv'>scores.csv</a>.</p>")
    for name, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts.append(f"<figure><a href='{name}'><img src='data:image/png;base64,{data}' alt='{name}'></a>"
                     f"<figcaption>{e(caption)} (<a href='{name}'>{name}</a>)</figcaption></figure>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
