"""`edge-inspect export-labels OUT`: the images people reviewed on the operator page, as a
training folder `edge-inspect train` takes as it is: OUT/good/*.png, OUT/<defect>/*.png.

The marks are recorder.dir/reviews.jsonl (agent/report/ui/review.py); the last mark of an image
wins. Images the recorder's quota has deleted since they were marked are counted as missing.
Files are copied, never moved: the recorder keeps managing its own directory.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from agent.report.ui.review import GOOD, RESERVED, ReviewStore


def export(recorder_dir: Path, out: Path) -> dict:
    """Copy every reviewed image that still exists; {class: n, "missing": n}."""
    store = ReviewStore(recorder_dir, [])
    counts: dict[str, int] = {}
    missing = 0
    for rel, r in sorted(store.reviews().items()):
        if r.label in RESERVED:
            raise ValueError(f"label {r.label!r} is a folder name the trainer reads as a split")
        try:
            src = store.resolve(rel)
        except ValueError:
            missing += 1
            continue
        dst_dir = out / r.label
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / src.name
        if dst.exists():        # the same part id on two days (a reset clock): keep both
            dst = dst_dir / f"{src.parent.parent.name}_{src.name}"
        shutil.copy2(src, dst)
        counts[r.label] = counts.get(r.label, 0) + 1
    return {**dict(sorted(counts.items())), "missing": missing}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="training folder to write (must be new or empty)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", "-c", type=Path, help="the daemon's config (its recorder.dir)")
    src.add_argument("--recorder-dir", type=Path, help="the recorder's image directory")
    args = ap.parse_args(argv[1:])
    from agent.config import ConfigError, load_config, print_problems

    if args.config is not None:
        try:
            rec = load_config(args.config, check_env=False).recorder.dir
        except ConfigError as e:
            return print_problems(e.problems)
    else:
        rec = args.recorder_dir
    if not rec.is_dir():
        return print_problems([f"recorder.dir: {rec} is not a folder"])
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        return print_problems([f"{args.out}: exists and is not an empty folder (a new export "
                               "must not mix with an old one)"])
    try:
        counts = export(rec, args.out)
    except ValueError as e:
        return print_problems([str(e)])
    missing = counts.pop("missing")
    total = sum(counts.values())
    print(f"exported {total} reviewed image(s) to {args.out}: " +
          (", ".join(f"{k} {v}" for k, v in counts.items()) or "none") +
          (f"; {missing} marked image(s) no longer recorded (deleted by the quota)"
           if missing else ""))
    if total and (GOOD not in counts or len(counts) < 2):
        print(f"note: edge-inspect train needs '{GOOD}' and at least one defect class; "
              f"this export has {', '.join(counts)}", file=sys.stderr)
    return 0 if total or not missing else 1
