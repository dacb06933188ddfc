"""`edge-inspect train --mode anomaly`: the command line of the good-only trainer
(convert.anomaly.train_anomaly); convert.train routes --mode here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from agent.runtime.anomaly import METHODS

from .anomaly import AnomalyOptions, train_anomaly
from .data import DataError


# -- the command line -------------------------------------------------------------------

def route_mode(argv: list[str]) -> tuple[list[str], int | None]:
    """convert.train's entry: strips --mode; (argv, None) lets the classifier trainer go on,
    (argv, exit code) means --mode anomaly ran here (or --mode was wrong)."""
    mode, rest, i = "classifier", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--mode" and i + 1 < len(argv):
            mode, i = argv[i + 1], i + 2
            continue
        if a.startswith("--mode="):
            mode = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if mode == "classifier":
        return rest, None
    if mode != "anomaly":
        print(f"{argv[0] if argv else 'edge-inspect train'}: --mode must be classifier or anomaly, "
              f"got {mode!r}", file=sys.stderr)
        return rest, 2
    return rest, main(rest)


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        w, h = int(w), int(h or w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if not (32 <= w <= 1024 and 32 <= h <= 1024 and w % 16 == 0 and h % 16 == 0):
        raise argparse.ArgumentTypeError(f"size must be multiples of 16 within 32..1024, got {text!r}")
    return w, h


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0] if argv else "edge-inspect train --mode anomaly",
                                description="Train a good-only anomaly bundle (good/ required; "
                                            "defect folders only report).")
    p.add_argument("data", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    p.add_argument("--memory", choices=("auto",) + METHODS, default="auto",
                   help="patchcore (nearest good patch), padim (Gaussian per position: fixtured "
                        "cameras), or auto (default): the better validation AUROC where defect "
                        "folders exist, else patchcore")
    p.add_argument("--input-size", type=_size, default=(224, 224), metavar="N|WxH")
    p.add_argument("--color", choices=["auto", "gray", "rgb"], default="auto")
    p.add_argument("--fit", choices=["stretch", "letterbox", "center_crop"], default="stretch")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of good images held back to set the threshold (default 0.2)")
    p.add_argument("--false-reject", type=float, default=0.01,
                   help="false-reject target on held-back good images (default 0.01)")
    p.add_argument("--bank", type=int, default=2000, help="patchcore coreset size (default 2000)")
    p.add_argument("--dim", type=int, default=None, help="PCA dims per patch (default 64 "
                   "patchcore, 96 padim)")
    p.add_argument("--smooth", type=float, default=None, help="map blur sigma in patches (0: none; "
                   "default: chosen on validation defects, else 3 patchcore, 1 padim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    try:
        a = p.parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    prog = p.prog
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    problems = []
    if not 0.0 < a.holdout < 0.9:
        problems.append("--holdout must be within (0, 0.9)")
    if not 0.0 <= a.false_reject < 0.5:
        problems.append("--false-reject must be within [0, 0.5)")
    if a.bank < 1 or (a.dim is not None and a.dim < 1) or (a.smooth is not None and a.smooth < 0):
        problems.append("--bank and --dim must be >= 1, --smooth >= 0")
    if problems:
        print(f"{prog}: " + "; ".join(problems), file=sys.stderr)
        return 2
    opts = AnomalyOptions(method=a.memory, size=a.input_size, color=a.color, fit=a.fit,
                          holdout=a.holdout, false_reject=a.false_reject, bank=a.bank, dim=a.dim,
                          smooth=a.smooth, seed=a.seed)
    from .lite0_weights import WeightsError
    try:
        res = train_anomaly(a.data, a.out, opts)
    except (DataError, WeightsError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    m = res["metrics"]
    v = m.get("test") or m["validation"]
    where = "test" if "test" in m else "held-back validation"
    line = (f"bundle {res['bundle']}: anomaly ({m['method']}), false reject "
            f"{100 * v['false_reject_rate']:.2f}% on {v['n_good']} {where} good")
    if v.get("n_defect"):
        line += (f", escape {100 * v['escape_rate']:.2f}% (<= {100 * v['escape_rate_upper_95']:.1f}% "
                 f"at 95%) on {v['n_defect']} defects, AUROC {v['auroc']:.3f}")
    print(line + f", memory {m['memory_bytes'] / 1e6:.1f} MB, {res['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
