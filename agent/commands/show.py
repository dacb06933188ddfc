"""edge-inspect show BUNDLE: what a model bundle is and where it can operate.

Moving the operating point later (model.threshold in the config, or the MQTT threshold
command) needs the trade the trainer measured on validation: for each escape target the
threshold and the false-reject rate it costs, and the same for fewer mirror views
(model.views). They live in bundle.json; this prints them, with the held-back results
and the provenance, without TensorFlow or a camera.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent.bundle import Bundle, BundleError, load_bundle


def _pct(x) -> str:
    return f"{100 * float(x):.1f}%" if isinstance(x, (int, float)) else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return ["  " + fmt.format(*header)] + ["  " + fmt.format(*r) for r in rows]


def render(b: Bundle, verified: bool) -> str:
    m, sel, prov = b.metrics, b.metrics.get("threshold_selection") or {}, b.provenance
    spec = b.input
    out = [
        f"bundle     {b.name or b.path.name}  ({b.path})",
        f"model      {b.model_sha256[:16]}…  files {', '.join(sorted(b.files))}  "
        f"({'hashes verified' if verified else 'HASHES DO NOT MATCH: see above'})",
        f"labels     {', '.join(b.labels)} (good: {b.good_label})",
        f"input      {spec.width}x{spec.height} {spec.color}, fit {spec.fit}, "
        f"tiles {list(spec.tiles)}, {spec.views} view(s) a tile",
        f"threshold  {b.threshold:g}"
        + (f" (chosen on {sel.get('on', 'validation')} for escape <= {_pct(sel['max_escape'])})"
           if "max_escape" in sel else ""),
    ]
    held = m.get("eval_split", "test")
    if m:
        out.append(f"{held:<10} n={m.get('n_eval', '-')}: int8 accuracy {_pct(m.get('int8_accuracy'))}, "
                   f"escape {_pct(m.get('escape_rate'))}"
                   + (f" (95% upper bound {_pct(m['escape_rate_upper_95'])})"
                      if "escape_rate_upper_95" in m else "")
                   + f", false reject {_pct(m.get('false_reject_rate'))}")
    points = sel.get("operating_points") or []
    out.append("")
    where = "out-of-fold" if (sel.get("out_of_fold") or {}).get("folds") else "validation"
    out.append(f"operating points ({where}; set model.threshold, or the threshold command):")
    if points:
        out += _table(["max escape", "threshold", "escape", "false reject"],
                      [[_pct(p.get("max_escape")), f"{float(p['threshold']):.4f}",
                        _pct(p.get("escape_rate")), _pct(p.get("false_reject_rate"))]
                       for p in points])
    else:
        out.append("  none recorded (a bundle from an older trainer: only the threshold above)")
    by_views = sel.get("by_views") or {}
    out.append("")
    out.append("by views (set model.views; each at its own threshold):")
    if by_views:
        rows = []
        for v, r in sorted(by_views.items(), key=lambda kv: -int(kv[0])):
            val, h = r.get("validation") or {}, r.get(held) or {}
            rows.append([v, f"{float(r['threshold']):.4f}", _pct(val.get("escape_rate")),
                         _pct(val.get("false_reject_rate")), _pct(h.get("accuracy")),
                         _pct(h.get("escape_rate")), _pct(h.get("false_reject_rate"))])
        out += _table(["views", "threshold", "val escape", "val FR", f"{held} acc",
                       f"{held} escape", f"{held} FR"], rows)
    else:
        out.append(f"  only {spec.views} (the bundle records no other)")
    out.append("")
    out.append("provenance:")
    for key in ("date", "dataset", "dataset_fingerprint", "seed", "architecture", "host"):
        if key in prov:
            out.append(f"  {key:<20} {prov[key]}")
    counts = prov.get("counts") or {}
    for split in ("train", "validation", "test"):
        if counts.get(split):           # "test": null when the data had no test/ folder
            out.append(f"  {split + ' images':<20} "
                       + ", ".join(f"{k} {n}" for k, n in counts[split].items()))
    versions = prov.get("versions") or {}
    if versions:
        out.append(f"  {'versions':<20} " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="model bundle directory (e.g. /var/lib/edge-inspect/models/current)")
    p.add_argument("--json", action="store_true", help="print bundle.json's content as loaded")
    args = p.parse_args(argv[1:])
    try:
        b = load_bundle(args.bundle, verify=False)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Shown even when a hash fails (that is when one wants to know what the bundle was),
    # but said loudly and with exit 1: this bundle must not be deployed.
    verified, problem = True, None
    try:
        load_bundle(args.bundle, verify=True)
    except BundleError as e:
        verified, problem = False, str(e)
    if args.json:
        print(json.dumps(b.to_manifest(), indent=2))
    else:
        if problem:
            print(f"error: {problem}", file=sys.stderr)
        print(render(b, verified))
    return 0 if verified else 1
