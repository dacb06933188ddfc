"""edge-inspect check-config FILE: the problems, one a line, or what would run.

OK means `run` starts with this file: the schema, the files and devices it names, and the
model bundle loaded as the daemon loads it (hashes, views, input spec, a smoke inference).
"""

from __future__ import annotations

import argparse
import sys

from agent.config import ConfigError, config_warnings, load_config, print_problems, summary
from agent.commands.preflight import describe_model, model_problems


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="path to config.toml")
    p.add_argument("--no-devices", action="store_true",
                   help="do not require the camera and serial devices to be plugged in now")
    args = p.parse_args(argv[1:])
    try:
        cfg = load_config(args.config, strict_devices=not args.no_devices)
    except ConfigError as e:
        return _fail(args.config, e.problems)
    problems = model_problems(cfg)
    if problems:
        return _fail(args.config, problems)
    for line in config_warnings(cfg):
        print(f"warning: {line}", file=sys.stderr)
    print(summary(cfg))
    print(describe_model(cfg))
    print(f"{args.config}: OK")
    return 0


def _fail(path: str, problems: list[str]) -> int:
    print_problems(problems)
    print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
    return 2
