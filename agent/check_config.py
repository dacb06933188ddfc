"""edge-inspect check-config FILE: the problems, one a line, or what would run."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, print_problems, summary


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
    p.add_argument("config", help="path to config.toml")
    p.add_argument("--no-devices", action="store_true",
                   help="do not require the camera and serial devices to be plugged in now")
    args = p.parse_args(argv[1:])
    try:
        cfg = load_config(args.config, strict_devices=not args.no_devices)
    except ConfigError as e:
        print_problems(e.problems)
        print(f"{args.config}: {len(e.problems)} problem(s)", file=sys.stderr)
        return 2
    print(summary(cfg))
    print(f"{args.config}: OK")
    return 0
