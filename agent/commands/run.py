"""`edge-inspect run --config FILE` (and `python -m agent run`): load the config, start an
Agent (agent/commands/daemon.py), wire the signals, supervise until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, config_warnings, load_config, print_problems

log = logging.getLogger("daemon")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=argv[0], description="Run the inspection daemon.")
    ap.add_argument("--config", "-c", required=True, help="path to config.toml")
    ap.add_argument("--no-devices", action="store_true",
                    help="start even if the camera or gate device is not plugged in yet")
    ap.add_argument("--pid-file", type=Path,
                    help="write this process's pid here at start and remove it on exit "
                         "(for deploy-model --pid-file outside systemd)")
    args = ap.parse_args(argv[1:])
    from agent.logs import setup_logging

    setup_logging("INFO")
    try:
        cfg = load_config(args.config, strict_devices=not args.no_devices)
    except ConfigError as e:
        return print_problems(e.problems)
    logging.getLogger().setLevel(cfg.log.level)
    for line in config_warnings(cfg):
        log.warning("%s", line)
    log.info("edge-inspect %s starting: station %s, config %s", __version__, cfg.station.id,
             args.config)
    # imported here: a config that fails its checks never loads the runtime
    from agent.commands.daemon import Agent, StartupError

    agent = Agent(cfg, config_path=args.config)
    # Before the pid file is out, and before start (which loads the model: seconds on a
    # busy box): a deploy-model that signals then gets its reload after start, not SIGHUP's
    # default (the daemon killed) or, under nohup, a reload silently lost.
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    if args.pid_file is not None:
        try:
            _write_pid(args.pid_file)
        except OSError as e:
            return print_problems([f"--pid-file: cannot write {args.pid_file}: {e.strerror}"])
    try:
        try:
            agent.start()
        except StartupError as e:
            return print_problems(e.problems)
        return agent.run()
    finally:
        if args.pid_file is not None:
            _remove_pid(args.pid_file)


def _write_pid(path: Path) -> None:
    """Atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pid(path: Path) -> None:
    # only our own: another agent may have taken the file over since
    try:
        if path.read_text().split()[:1] == [str(os.getpid())]:
            path.unlink()
    except (OSError, IndexError):
        pass
